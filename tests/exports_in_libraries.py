"""Load an export the way its users do, inside .venv-detect (`make detect-env`); prints one json line.

    python exports_in_libraries.py yolo DATA_YAML [--train WORKDIR]   check_det_dataset, YOLODataset per split,
                                                                      and a 1-epoch yolov8n-seg from its yaml
    python exports_in_libraries.py anomalib ROOT                      anomalib's Folder datamodule, set up

Needs no network: run it with YOLO_OFFLINE=1 and YOLO_CONFIG_DIR set (the test does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def yolo(data_yaml: str, train: str | None) -> dict:
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(data_yaml, autodownload=False)
    out = {"nc": data["nc"], "names": list(data["names"].values()), "splits": {}}
    for split in ("train", "val"):
        dataset = YOLODataset(img_path=data[split], imgsz=64, augment=False, data=data, task=data.get("task", "detect"))
        out["splits"][split] = {
            "path": str(Path(data[split]).resolve()),
            "images": sorted(Path(f).stem for f in dataset.im_files),
            "instances": sum(len(label["cls"]) for label in dataset.labels),
            "classes": sorted({int(c) for label in dataset.labels for c in label["cls"].flatten()}),
        }
    if train:
        from ultralytics import YOLO

        model = YOLO("yolov8n-seg.yaml" if data.get("task") == "segment" else "yolov8n.yaml")
        model.train(data=data_yaml, epochs=1, imgsz=64, batch=4, device="cpu", workers=0, plots=False, amp=False,
                    project=train, name="run", exist_ok=True, verbose=False, pretrained=False)
        out["trained"] = sorted(p.name for p in (Path(train) / "run" / "weights").iterdir())
    return out


def anomalib(root: str) -> dict:
    from anomalib.data import Folder

    summary = json.loads((Path(root) / "export.json").read_text())
    folder = summary["counts"]["folder_datamodule"]
    datamodule = Folder(**folder, num_workers=0, train_batch_size=2, eval_batch_size=2, seed=0)
    datamodule.setup()

    def names(dataset) -> list[str]:
        return sorted(Path(p).stem for p in dataset.samples["image_path"])

    test = datamodule.test_data.samples
    return {"train": names(datamodule.train_data), "test": names(datamodule.test_data),
            "val": names(datamodule.val_data),
            "test_masks": sorted(Path(p).stem for p in test["mask_path"] if p),
            "test_labels": {Path(p).stem: int(label) for p, label in zip(test["image_path"], test["label_index"])}}


if __name__ == "__main__":
    kind, path, *rest = sys.argv[1:]
    train = rest[1] if rest[:1] == ["--train"] else None
    print(json.dumps(yolo(path, train) if kind == "yolo" else anomalib(path)))
