# Two commands for a fresh machine (Python 3.11 and access to PyPI are all they need):
#   make demo   preprocess Shakespeare -> train -> evaluate -> sample, a few minutes on a CPU
#   make test   the test suite (what CI runs)
PYTHON ?= python3.11
comma := ,
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# TensorFlow 2.20, the newest TPU build on PyPI (docs/cloud.md, "TPU"), next to 2.21: the CPU build
# for the suite's TensorFlow part, and the TPU image's own environment (Dockerfile.tpu) to check it.
VENV_TF220 := .venv-tf220
VENV_TPU := .venv-tpu
# The suite's TensorFlow part a TPU job runs, again on TensorFlow 2.20 in `make test`: kernels (the
# native op built against 2.20's headers), models, training, --steps_per_execution, precision,
# distribution, export and sampling: 129 tests, ~2 minutes here. The whole suite on 2.20 (`make
# test-tf220-full`) takes ~10 minutes, which would push `make test` past CI's 15 (docs/cloud.md, "TPU").
TF_TESTS := tests/test_kernels.py tests/test_native_build.py tests/test_model_fn.py tests/test_mixed_precision.py tests/test_cudnn.py \
    tests/test_zoo_layers.py tests/test_trainer.py tests/test_trainer_data.py tests/test_trainer_progress.py \
    tests/test_steps_per_execution.py tests/test_distribute.py tests/test_export.py tests/test_sampling.py \
    tests/test_batch_splits.py tests/test_native_attention.py

DATA := data/shakespeare
JOB := job/%JOB%
TB := tensorboard-data/%JOB%
DEMO_MODEL := --layers 2 --lstm_state_size 256 --embedding_size 64 --unroll_steps 64 --batch_size 32

.PHONY: install install-tf220 demo test test-tf220 test-tf220-full lint bench clean

# $(call make_venv,DIR,CONSTRAINTS,EXTRAS): a venv with verne installed (editable) and pip check clean.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet --upgrade pip
	$(1)/bin/pip install --quiet -c $(2) -e '.[$(3)]'
	$(1)/bin/pip check
	touch $(1)/.installed
endef

install: $(INSTALLED)

$(INSTALLED): setup.py constraints.txt
	$(call make_venv,$(VENV),constraints.txt,cpu$(comma)dev)

install-tf220: $(VENV_TF220)/.installed $(VENV_TPU)/.installed

$(VENV_TF220)/.installed: setup.py constraints.txt constraints-tpu.txt
	$(call make_venv,$(VENV_TF220),constraints-tpu.txt,cpu-tf220$(comma)dev)

# The requirements Dockerfile.tpu installs (editable here, so tests/test_tpu_image.py runs the
# checkout's code in it).
$(VENV_TPU)/.installed: setup.py constraints.txt constraints-tpu.txt
	$(call make_venv,$(VENV_TPU),constraints-tpu.txt,tpu)

demo: install
	$(PY) -m preprocessing.corpora shakespeare --dest training-data
	$(PY) -m preprocessing.run --input 'training-data/shakespeare/*.txt' --output_dir $(DATA) \
	    --data_prefix shakespeare --tokenizer char
	$(PY) -m trainer.task --data_dir $(DATA) --data_prefix shakespeare --job-dir $(JOB) \
	    --summary_dir $(TB) $(DEMO_MODEL) --max_steps 1200 --eval_every 400 --eval_steps 50
	$(PY) -m trainer.evaluate --data_dir $(DATA) --data_prefix shakespeare --job-dir $(JOB) \
	    $(DEMO_MODEL) --split test
	$(PY) -m trainer.babble --data_dir $(DATA) --data_prefix shakespeare --job-dir $(JOB) \
	    $(DEMO_MODEL) --prime 'ROMEO.' --length 400 --temperature 0.8 --seed 7
	@echo
	@echo "Next: TensorBoard      $(VENV)/bin/tensorboard --logdir tensorboard-data"
	@echo "      generate more    $(PY) -m trainer.babble --job-dir job/shakespeare-256-states-2-layers-char-emb64 --prime 'JULIET.'"
	@echo "      web page         $(PY) -m trainer.serve --job-dir job/shakespeare-256-states-2-layers-char-emb64  (then open http://127.0.0.1:8080/ui)"
	@echo "      SavedModel       job/shakespeare-256-states-2-layers-char-emb64/export (plain tf.saved_model.load)"

# The whole suite on TensorFlow 2.21 (with the TPU image's environment checked), then its
# TensorFlow part again on 2.20.
test: install install-tf220
	sh tests/install_browser.sh
	VERNE_TPU_PYTHON=$(CURDIR)/$(VENV_TPU)/bin/python $(PY) -m pytest -q -rs tests
	$(MAKE) test-tf220

test-tf220: install-tf220
	$(VENV_TF220)/bin/python -m pytest -q -rs $(TF_TESTS)

test-tf220-full: install-tf220
	sh tests/install_browser.sh
	$(VENV_TF220)/bin/python -m pytest -q -rs tests

bench: install
	$(PY) bench/preprocess.py
	$(PY) -m bench.train
	$(PY) -m bench.sample
	$(PY) bench/quality.py
	$(PY) bench/subword.py
	$(PY) bench/models.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf data job tensorboard-data pipeline-root
