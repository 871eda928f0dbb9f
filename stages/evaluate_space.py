"""Stage evaluate_space: every uniform config (and sampled ones): MACs, accuracy, accuracy after fine-tuning."""

from ofa import pipeline


def run(params):
    records, summary = pipeline.evaluate_space(params)
    print(pipeline.table(records, params.evaluate.finetune.epochs).to_string(index=False))
    return summary


pipeline.main(run)
