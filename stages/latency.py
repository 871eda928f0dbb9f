"""Stage latency: the latency table of the architecture on the target device, checked against whole subnets."""

from ofa.pipeline import latency, process


def run(params):
    return latency.latency(params)


process.main(run, parallel=False)  # one process: timings of several at once would slow each other
