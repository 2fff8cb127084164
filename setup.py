# All metadata lives in pyproject.toml; this file exists so that `pip install -e .`
# also works with older setuptools/pip combinations (legacy editable installs).
from setuptools import setup

setup()
