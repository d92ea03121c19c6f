"""Quality evaluation: sample metrics of a synthesis run and the downstream detector benchmark.

    python -m dmgr.eval samples RUN_DIR                     class fidelity, KID, seams, diversity
    python -m dmgr.eval downstream --run fast=RUN_DIR ...   same segmenter trained on each source

metrics.py   plain tensor functions (KID, seam ratio, diversity, AUROC, AP, IoU)
real.py      real procedural data with exact masks, from seed streams disjoint from training
classifier.py the 7-class patch classifier whose features the sample metrics use
shards.py    reading runs back through webdataset
samples.py   the sample metrics; sources.py / segment.py / downstream.py the benchmark
paste.py     the no-rectification baseline (extras.paste): a plain local-model sample pasted into the twin
report.py    markdown + JSON + PNG
"""
