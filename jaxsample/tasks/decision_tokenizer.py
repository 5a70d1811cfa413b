"""Hugging Face tokenizer files for the decision task, so its checkpoint loads like any other.

The vocabulary is a WordLevel model over whitespace-separated symbols (`<bos> <item> 1 0 ...
<sep> <none> ... <go> R 1 0 ...`); `write_tokenizer` saves tokenizer.json,
tokenizer_config.json and special_tokens_map.json beside the task's own config
(decision_task.json), which `read_task_config` reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from jaxsample.errors import ConfigError
from jaxsample.tasks.decisions import BOS, EOS, PAD, UNK, DecisionTaskConfig, DecisionVocabulary

TASK_CONFIG_FILE = "decision_task.json"


def decision_tokenizer(config: DecisionTaskConfig) -> Tokenizer:
    """The task's `tokenizers.Tokenizer` (ids equal to `DecisionVocabulary(config)`'s)."""
    tokens = DecisionVocabulary(config).tokens()
    word_level = models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[UNK])
    tokenizer = Tokenizer(word_level)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([tokens[i] for i in (PAD, UNK, BOS, EOS)])
    return tokenizer


def write_tokenizer(
    directory: str | Path, config: DecisionTaskConfig = DecisionTaskConfig()
) -> Path:
    """Writes the tokenizer files and decision_task.json into `directory` (created if needed).

    Returns:
      the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = DecisionVocabulary(config).tokens()
    decision_tokenizer(config).save(str(directory / "tokenizer.json"))
    special = {"bos_token": tokens[BOS], "eos_token": tokens[EOS], "pad_token": tokens[PAD],
               "unk_token": tokens[UNK]}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_sequence_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    _write_json(directory / "tokenizer_config.json", tokenizer_config)
    _write_json(directory / "special_tokens_map.json", special)
    _write_json(directory / TASK_CONFIG_FILE, config.to_dict())
    return directory


def read_task_config(directory: str | Path) -> DecisionTaskConfig:
    """The `DecisionTaskConfig` saved by `write_tokenizer` in `directory`."""
    path = Path(directory) / TASK_CONFIG_FILE
    try:
        fields = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no decision-task config (written by write_tokenizer)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{path}: expected a JSON object of DecisionTaskConfig fields")
    try:
        return DecisionTaskConfig.from_dict(fields)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
