"""Stage evaluate_space: every uniform config (and sampled ones): MACs, accuracy, accuracy after fine-tuning."""

from ofa.pipeline import evaluate_space, process


def run(params):
    result = evaluate_space.evaluate_space(params)
    if result is None:  # a rank other than 0: rank 0 reports
        return None
    records, summary = result
    print(evaluate_space.table(records, params.evaluate.finetune.epochs).to_string(index=False))
    return summary


process.main(run)
