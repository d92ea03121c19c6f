"""Exports of a finished synthesis run for detectors and anomaly models: `python -m dmgr.export FORMAT RUN OUT`.

coco (instance segmentation, RLE masks), yolo (segmentation polygons or boxes + data.yaml), anomalib
(normal / normal_val / abnormal / ground_truth folders). Every export splits train and val by a hash of the seed,
leaves out flagged samples unless asked, can merge the user's labelled images and tile large frames, streams
shard by shard, resumes (a rerun verifies and skips the shards already exported) and records what it exported
in OUT/export.json.
"""
