#!/usr/bin/env bash
# Gradescope's setup script: runs once while the autograder image is built (Ubuntu).
# The autograder zip holds this file, run_autograder and the repository in tinygrad_llm/.
set -eux
apt-get update
apt-get install -y python3 python3-pip
# A CPU build of torch, not a multi-GB CUDA one.
pip3 install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
pip3 install -e "/autograder/source/tinygrad_llm[grade]"
