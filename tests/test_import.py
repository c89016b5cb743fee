"""`import wren` must need nothing beyond torch, tokenizers, safetensors and numpy."""

import subprocess
import sys

PROBE = """
import sys
import numpy, safetensors, tokenizers, torch
def top_level():
    return {name.split(".")[0] for name in sys.modules}
before = top_level()
import wren
wren.CausalLM, wren.load_model, wren.Tokenizer
import wren.cli, wren.checkpoint.info, wren.data.demo
print(sorted(top_level() - before - set(sys.stdlib_module_names) - {"wren"}))
"""


def test_import_wren_pulls_in_no_optional_dependency():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_command_line_starts_without_torch():
    probe = "import sys, wren, wren.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
