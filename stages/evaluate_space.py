"""Stage evaluate_space: every uniform config (and sampled ones): MACs, accuracy, accuracy after fine-tuning."""

from ofa import pipeline


def run(params):
    result = pipeline.evaluate_space(params)
    if result is None:  # a rank other than 0: rank 0 reports
        return None
    records, summary = result
    print(pipeline.table(records, params.evaluate.finetune.epochs).to_string(index=False))
    return summary


pipeline.main(run)
