# dmgr: two set-up commands on a fresh machine: `make synth` and `make test`; `make` (or `make help`) lists every target.
# The first use creates .venv with the pinned CPU torch; elsewhere pass your own CUDA build:
#   make venv TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"   (pyproject.toml: torch 2.13)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
DEVICE ?= cpu
# The newest run by modification time (a run in progress included), not the name that sorts last.
SHARDS ?= $(firstword $(shell ls -td outputs/*/shards 2>/dev/null))
OUT ?= preview.png

SWEEP ?= sweep
SWEEP_ARGS ?= seeds=0-7 schedule.T_s=20,30,40 schedule.T_e=4,8,12
SLURM_ARRAY ?= 0-3
SLURM_GPUS ?= 1
SLURM_CPUS ?= 4
SLURM_TIME ?= 24:00:00
SLURM_PARTITION ?=
SLURM_FLAGS ?=

RUN ?= $(patsubst %/manifest.json,%,$(firstword $(shell ls -t outputs/*/manifest.json 2>/dev/null)))
EVAL_SEEDS ?= 0-63
EVAL_N ?= 64
EVAL_JOBS ?= 2
# The generated-board run (make eval-runs-boards) also writes the no-rectification paste baseline.
EVAL_BOARDS = dataset.source=generate screen.enabled=false schedule=fast extras.paste=true extras.twin=true seeds=$(EVAL_SEEDS)

DEMO_DATA ?= outputs/pcb-data
DEMO_GLOBAL_STEPS ?= 3000
DEMO_LOCAL_STEPS ?= 6000
DEMO_MASK_STEPS ?= 1500

.DEFAULT_GOAL := help

.PHONY: help venv backgrounds synth test test-fast bench bench-job bench-train lint preview eval eval-runs eval-runs-boards downstream sweep sweep-report slurm data train-global train-local train-local-mask train-demo clean-venv detect-env

# `make` alone prints this list; every target's text is the `##` comment on its rule line.
help: ## this list of targets
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-z][a-z-]*:[^=#]*## / {printf "  make %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed ## create .venv: the pinned torch (TORCH_SPEC=... for your CUDA build) and dmgr with its dev extras

# The demo's real defect-free backgrounds: boards rendered by dmgr.data (no model involved), with per-class ROIs
# (where on each panel each class occurs, as a user would draw them from the board's layout).
DEMO_BACKGROUNDS ?= outputs/pcb-backgrounds
$(DEMO_BACKGROUNDS)/backgrounds.jsonl: | venv
	$(PY) -m dmgr.data.export --out $(DEMO_BACKGROUNDS) --size 64 --panel 160x112 --boards 256 --patches-per-class 0 --test 0 --roi-slack 2 --quiet
	touch $@

backgrounds: $(DEMO_BACKGROUNDS)/backgrounds.jsonl ## render the demo's 256 defect-free board panels and their per-class ROIs into outputs/pcb-backgrounds/ (no model)

synth: venv backgrounds ## run the synthesis job (the demo: 16 defects into real boards); Hydra overrides in ARGS="..."
	$(PY) -m dmgr.synth $(ARGS)

# Two pytest workers, one test module at a time each (tests/conftest.py orders the long modules first).
TEST_WORKERS ?= 2
test: venv detect-env ## the whole test suite, two pytest workers (TEST_WORKERS=N); first use builds .venv-detect
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests $(ARGS)

# Everything but the end-to-end tests (marked pytest.mark.slow where they are defined): about a minute.
test-fast: venv ## every test but the end-to-end ones (about a minute)
	$(PY) -m pytest -q -m "not slow" tests $(ARGS)

# make bench DEVICE=cuda: the paper architecture on the GPU, with seconds per image and the FLOP bound.
bench: venv ## the sampler's seconds per image, network passes and FLOPs (DEVICE=cuda: paper architecture)
	$(PY) -m dmgr.bench --device $(DEVICE) $(ARGS)

# make bench-job: the whole job's images/s with 1 and 2 workers and with a null shard writer.
bench-job: venv ## the whole job's images/s: 1 against 2 workers, and the shard writer's cost
	$(PY) -m dmgr.bench_job $(ARGS)

# make bench-train: the loader's tiles/s on 2448x2048 grey frames, then per architecture and data set steps/s,
# images/s, data wait, FLOPs per step against the matmul rate, peak memory (DEVICE=cuda: the presets too).
bench-train: venv ## training cost: loader tiles/s, steps/s, data wait, FLOPs, peak memory per architecture
	$(PY) -m dmgr.bench_train --device $(DEVICE) $(ARGS)

lint: venv ## ruff check dmgr tests
	$(VENV)/bin/ruff check dmgr tests

preview: venv ## contact sheet of the newest run (or SHARDS=<run>/shards) -> preview.png (OUT=...)
	@test -n "$(SHARDS)" || { echo "make preview: no run under outputs/ (make synth first, or SHARDS=<run>/shards)"; exit 2; }
	$(PY) -m dmgr.preview $(SHARDS) --out $(OUT) $(ARGS)

# Sample metrics of a run (default: the last one under outputs/): RUN/eval/samples.{md,json,png}.
eval: venv ## sample metrics of the newest run (or RUN=outputs/<run>) -> RUN/eval/
	$(PY) -m dmgr.eval samples $(RUN) $(ARGS)

# The downstream benchmark: DMGR into real boards with the default job and with schedule=paper
# (resumable runs), then the same segmenter trained on each source and tested on held-out real boards
# (each model's scores cached in outputs/eval/downstream/models/, so a rerun trains only what changed).
eval-runs: venv backgrounds ## the downstream benchmark's synthesis runs on real boards (resumable)
	$(PY) -m dmgr.synth seeds=$(EVAL_SEEDS) extras.input=true out_dir=outputs/eval-runs/real
	$(PY) -m dmgr.synth schedule=paper seeds=$(EVAL_SEEDS) batch_size=8 extras.input=true \
	  out_dir=outputs/eval-runs/real-paper

downstream: eval-runs ## the downstream benchmark: one segmenter per data source, tested on held-out real boards
	$(PY) -m dmgr.eval downstream --run real=outputs/eval-runs/real --run real-paper=outputs/eval-runs/real-paper \
	  --mix real --n $(EVAL_N) --jobs $(EVAL_JOBS) --out outputs/eval/downstream $(ARGS)

# DMGR on generated boards (the whole-board walk) with the paste baseline, for comparison:
#   make eval-runs-boards && make downstream ARGS="--run boards=outputs/eval-runs/boards"
eval-runs-boards: venv ## a DMGR run on generated boards with the paste baseline, for the benchmark
	$(PY) -m dmgr.synth $(EVAL_BOARDS) out_dir=outputs/eval-runs/boards

# The procedural PCB domain on disk: global/ (boards), local/<class>/ (patches), test/ (held out).
$(DEMO_DATA)/.exported: | venv
	$(PY) -m dmgr.data.export --out $(DEMO_DATA) --size 64 --boards 3000 --patches-per-class 1000 --test 200 --seed 0
	touch $@

data: $(DEMO_DATA)/.exported ## the procedural PCB domain on disk: outputs/pcb-data/{global,local,test}

train-global: data ## train the demo's global model (arch=demo_global); ARGS="steps=..."
	$(PY) -m dmgr.train arch=demo_global data_root=$(DEMO_DATA) $(ARGS)

train-local: data ## train the demo's RGB local model (arch=demo_local)
	$(PY) -m dmgr.train arch=demo_local data_root=$(DEMO_DATA) $(ARGS)

# The mask-generating local model (RGB + defect mask), fine-tuned from the RGB local model's weights.
train-local-mask: data ## fine-tune the mask-generating local model (RGB + mask) from the RGB one
	$(PY) -m dmgr.train arch=demo_local_mask data_root=$(DEMO_DATA) steps=$(DEMO_MASK_STEPS) batch_size=32 \
	  ema_rate=0.998 init_from=outputs/train-demo_local/ema.safetensors $(ARGS)

# The demo models from scratch (resumable), then their EMA weights into checkpoints/demo/.
train-demo: data ## train all demo models from scratch and copy their EMA weights to checkpoints/demo/
	$(PY) -m dmgr.train arch=demo_global data_root=$(DEMO_DATA) steps=$(DEMO_GLOBAL_STEPS) batch_size=16
	$(PY) -m dmgr.train arch=demo_local data_root=$(DEMO_DATA) steps=$(DEMO_LOCAL_STEPS) batch_size=32
	$(PY) -m dmgr.train arch=demo_local_mask data_root=$(DEMO_DATA) steps=$(DEMO_MASK_STEPS) batch_size=32 \
	  ema_rate=0.998 init_from=outputs/train-demo_local/ema.safetensors
	mkdir -p checkpoints/demo
	cp outputs/train-demo_global/ema.safetensors checkpoints/demo/global.safetensors
	cp outputs/train-demo_local_mask/ema.safetensors checkpoints/demo/local.safetensors

# Hydra multirun over T_s/T_e (invalid points are reported and skipped), then the report.
sweep: venv ## Hydra multirun over T_s / T_e (SWEEP_ARGS), then the sweep report
	$(PY) -m dmgr.synth -m hydra.sweep.dir=outputs/sweeps/$(SWEEP) $(SWEEP_ARGS) $(ARGS)
	$(PY) -m dmgr.sweep outputs/sweeps/$(SWEEP)

sweep-report: venv ## the report of a finished sweep (SWEEP=name)
	$(PY) -m dmgr.sweep outputs/sweeps/$(SWEEP)

# A Slurm array job: each task takes its share of shards (resubmitting skips complete shards).
slurm: venv ## submit the job as a Slurm array (SLURM_ARRAY, SLURM_GPUS, SLURM_PARTITION, ...)
	mkdir -p outputs/slurm
	sbatch --array=$(SLURM_ARRAY) --time=$(SLURM_TIME) --cpus-per-task=$(SLURM_CPUS) \
	  $(if $(SLURM_PARTITION),--partition=$(SLURM_PARTITION)) \
	  $(if $(filter 0,$(SLURM_GPUS)),--gres=none,--gres=gpu:$(SLURM_GPUS)) \
	  --export=ALL,DMGR_NPROC=$(if $(filter 0,$(SLURM_GPUS)),1,$(SLURM_GPUS)) \
	  $(SLURM_FLAGS) jobs/slurm_array.sbatch $(ARGS)

# The libraries users load exports with, in their own venv (PyPI's torchvision does not import beside .venv's
# torch pin): the export tests run its python in a subprocess; other benchmarks may reuse it (YOLO as a judge).
DETECT_VENV ?= .venv-detect
DETECT_SPEC ?= torch==2.14.1 torchvision==0.29.1 ultralytics==8.4.190 anomalib==2.7.0 pycocotools==2.0.11
$(DETECT_VENV)/.installed:
	$(PYTHON) -m venv $(DETECT_VENV)
	$(DETECT_VENV)/bin/python -m pip install -q $(DETECT_SPEC)
	touch $@

detect-env: $(DETECT_VENV)/.installed ## .venv-detect: Ultralytics, anomalib, pycocotools (the export library tests run them)

clean-venv: ## remove .venv
	rm -rf $(VENV)
