"""Stage specialize: per-block search for the most accurate subnet within each MACs budget; export the picks."""

from ofa import pipeline, specialize


def run(params):
    summary = specialize.specialize(params)
    print(specialize.table(summary).to_string(index=False))
    return summary


pipeline.main(run)
