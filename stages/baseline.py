"""Stage baseline: chosen configs trained alone from the seed's init, each the from-scratch twin of a subnet."""

from ofa.pipeline import baseline, process


def run(params):
    result = baseline.baseline(params)
    if result is None:  # a rank other than 0: rank 0 reports
        return None
    return {"configs": len(result["records"]), "epochs": result["epochs"],
            "images_per_epoch": result["images_per_epoch"],
            "accuracy": {r["config"]: r["accuracy"] for r in result["records"]}}


process.main(run)
