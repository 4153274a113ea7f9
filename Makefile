.PHONY: serve test check bench
serve:
	scripts/dev.sh serve
test check:
	scripts/dev.sh test
bench:
	.venv/bin/python -m bench
