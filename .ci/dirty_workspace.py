"""Leave the workspace as a user's looks after `make quick` and some edits of their own, with values no test expects:
params.yaml changed in every section, and junk where the pipeline's outputs go. The suite that runs next must
pass all the same: tests read the committed params from git and build their own projects."""

from pathlib import Path

import yaml

root = Path(__file__).resolve().parents[1]
params = yaml.safe_load((root / "params.yaml").read_text())
params["seed"] = 7
params["data"].update(dataset="fashion_mnist", train_limit=1000, val_images=50000)
params["space"].update(kernel=[3], depth=[1])
params["net"]["final_channels"] = 8
params["train"].update(batch_size=7, processes=3, device="cuda")
params["supernet"].update(epochs=1, lr=9.0)
for stage in ("kernel", "depth", "width"):
    params["shrink"][stage].update(epochs=1, lr=9.0)
params["evaluate"]["finetune"].update(epochs=0, lr=9.0)
params["specialize"].update(budgets=[1], trials=1, cost="latency")
params["latency"].update(runtime="torch", threads=3, validate=0, device="a-phone", table="latency_tables/phone.json")
(root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
(root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
for junk in ("data/prepared/train.pt", "data/prepared/classes.json", "models/train_supernet.pt",
             "models/shrink_width.pt", "models/latency_table.json", "models/arch.json", "metrics/space.json",
             "metrics/specialize.json", "metrics/latency.json", "latency_tables/phone.json", ".resume/specialize.db"):
    (root / junk).parent.mkdir(parents=True, exist_ok=True)
    (root / junk).write_text("not what a test may read\n")
print("workspace dirtied: params.yaml edited, junk in data/, models/, metrics/, latency_tables/, .resume/, dvc.lock")
