"""Stage specialize: per-block search for the most accurate subnet within each MACs budget; export the picks."""

from ofa.pipeline import process, specialize


def run(params):
    picks = specialize.specialize(params)
    if picks is None:  # a rank other than 0: rank 0 reports
        return None
    print(specialize.table(picks).to_string(index=False))
    return specialize.headline(picks)


process.main(run)
