"""Configuration classes copied into original-format checkpoints and loaded there with `trust_remote_code`.

They are dvd-serve's own code (not the upstream files): enough for transformers and vLLM to parse an
`InternVLChatModel` config.json offline. No modeling code is shipped; vLLM uses its built-in model class.
"""

from pathlib import Path

REMOTE_CODE_FILES = ("configuration_intern_vit.py", "configuration_internvl_chat.py")
REMOTE_CODE_DIR = Path(__file__).parent
# What config.json's `auto_map.AutoConfig` names: module file (without .py) and class.
AUTO_CONFIG_REFERENCE = "configuration_internvl_chat.InternVLChatConfig"
