"""Stage specialize: per-block search for the most accurate subnet within each MACs budget; export the picks."""

from ofa.pipeline import process, specialize


def run(params):
    summary = specialize.specialize(params)
    if summary is not None:  # None on a rank other than 0: rank 0 reports
        print(specialize.table(summary).to_string(index=False))
    return summary


process.main(run)
