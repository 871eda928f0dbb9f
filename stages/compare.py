"""Stage compare: the baseline's configs trained alone beside the supernet's subnets, and their training times."""

from ofa.pipeline import compare, process


def run(params):
    result = compare.compare(params)
    if result is None:  # a rank other than 0: rank 0 reports
        return None
    if result[0]["configs"]:
        print(compare.table(result[0]).to_string(index=False))
    print(compare.totals_line(result[0]))
    return result[1]


process.main(run)
