"""Tokenizer: text <-> token ids for a checkpoint, bos/eos handling, batches, chat template, save."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors

from zamba2 import compat
from zamba2.tokenizer.batch import (
    NO_LIMIT,
    BatchEncoding,
    as_tensors,
    check_options,
    clean_up_tokenization_spaces,
    pad_batch,
    truncate,
)
from zamba2.tokenizer.config import (
    _TOKEN_KEYS,
    _add_config_tokens,
    _call_settings,
    _chat_template_from_config,
    _read_json,
    _token_content,
)
from zamba2.tokenizer.sentencepiece import _backend_from_sentencepiece, read_sentencepiece_model

logger = logging.getLogger("zamba2.tokenizer")


def _raise_from_template(message: str) -> None:
    raise _TemplateRaised(message)


class _TemplateRaised(Exception):
    """raise_exception(...) called by a chat template."""


# --- Tokenizer ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for a checkpoint, plus its chat template. Knows nothing about the model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        source: str = "<in memory>",
    ) -> None:
        self.backend = backend
        self.source = source  # the folder it came from, named in error messages
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token = unk_token
        self.bos_token_id = self._token_id("bos_token", bos_token)
        self.eos_token_id = self._token_id("eos_token", eos_token)
        self.unk_token_id = self._token_id("unk_token", unk_token)
        self.pad_token = pad_token  # a property: sets pad_token_id too
        # The call's defaults, as tokenizer_config.json names them: left padding keeps every row's last token
        # in the last column, which generation wants; model_max_length None = no limit.
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        if add_bos_token and self.bos_token_id is None:
            raise ValueError(f"{source}: add_bos_token is true but there is no bos_token")
        if add_eos_token and self.eos_token_id is None:
            raise ValueError(f"{source}: add_eos_token is true but there is no eos_token")
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, token in added.items() if token.special)
        self._template: Template | None = None  # compiled on first use
        self._warned_clean_up = False

    @property
    def pad_token(self) -> str | None:
        return self._pad_token

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        """`tokenizer.pad_token = tokenizer.eos_token` works as in transformers (pad_token_id follows)."""
        self.pad_token_id = self._token_id("pad_token", token)
        self._pad_token = token

    def _token_id(self, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: {name} {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
    ) -> Tokenizer:
        """Load from a folder, or a hub id ("org/name") resolved like the model's from_pretrained (the hub
        cache, `revision`, `cache_dir`, HF_HUB_OFFLINE), holding tokenizer.json (preferred) or tokenizer.model,
        plus the optional tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
        from zamba2.checkpoint.files import TOKENIZER_PATTERNS, resolve_model_dir

        root = resolve_model_dir(
            path_or_id, revision=revision, cache_dir=cache_dir, token=token, patterns=TOKENIZER_PATTERNS
        )
        config_path = root / "tokenizer_config.json"
        # tokenizer_config.json wins; special_tokens_map.json fills in what it lacks.
        config = {**_read_json(root / "special_tokens_map.json"), **_read_json(config_path)}
        if (root / "tokenizer.json").is_file():
            backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
            names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
            defaults = {key: name for key, name in names.items() if backend.token_to_id(name) is not None}
        elif (root / "tokenizer.model").is_file():
            sp = read_sentencepiece_model(root / "tokenizer.model")
            backend = _backend_from_sentencepiece(sp, root / "tokenizer.model")
            ids = dict(zip(_TOKEN_KEYS, (sp.bos_id, sp.eos_id, sp.unk_id, sp.pad_id), strict=True))
            defaults = {key: sp.pieces[i][0] for key, i in ids.items() if 0 <= i < len(sp.pieces)}
            _add_config_tokens(backend, config, config_path)
        else:
            raise FileNotFoundError(f"{root}: no tokenizer.json or tokenizer.model in this folder")
        tokens = {
            key: _token_content(config.get(key, defaults.get(key)), f"{config_path}: {key}")
            for key in _TOKEN_KEYS
        }
        flags = {
            "add_bos_token": config.get("add_bos_token", True),
            "add_eos_token": config.get("add_eos_token", False),
        }
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{config_path}: {key} must be true or false, got {value!r}")
        template_file = root / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _chat_template_from_config(
                config.get("chat_template"), f"{config_path}: chat_template"
            )
        settings = _call_settings(config, config_path)
        return cls(backend, **tokens, **flags, chat_template=template, **settings, source=str(root))

    # --- encoding / decoding -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _specials(self, add_special_tokens: bool) -> tuple[list[int], list[int]]:
        """The ids that go before and after a text: bos / eos per add_bos_token / add_eos_token."""
        if not add_special_tokens:
            return [], []
        before = [self.bos_token_id] if self.add_bos_token else []
        after = [self.eos_token_id] if self.add_eos_token else []
        return before, after  # type: ignore[return-value]

    def _with_special(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        before, after = self._specials(add_special_tokens)
        return [*before, *ids, *after]

    def encode(
        self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None
    ) -> list[int] | torch.Tensor:
        """Token ids for `text`; bos/eos are added per add_bos_token/add_eos_token when asked.
        `return_tensors="pt"` gives a (1, T) tensor, as transformers' encode does."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        # The backend's own post-processor is bypassed so tokenizer_config.json alone decides bos/eos.
        if len(text) < 4096:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:  # same ids, but encode_batch releases the GIL (encode holds it: ~1 s per MB of text), so a long
            # text tokenised in a worker thread (the server) does not stop every other thread meanwhile
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        ids = self._with_special(ids, add_special_tokens)
        if return_tensors is None:
            return ids
        check_options(False, None, return_tensors, self.padding_side, self.truncation_side)
        return torch.tensor([ids], dtype=torch.long)

    def _check_ids(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids, size = [int(i) for i in ids], self.vocab_size
        for i in ids:
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {size})")
        return ids

    def decode(
        self,
        ids: Sequence[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text for a sequence of ids (a list or a 1-D tensor). `clean_up_tokenization_spaces` (default: the
        tokenizer's, from tokenizer_config.json, else False) drops spaces before punctuation and contractions."""
        text = self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)
        return self._clean_up(text, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        batch: Sequence[Sequence[int]] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """decode() for each row of a list of id lists or a (B, T) tensor."""
        rows = [self._check_ids(row) for row in batch]
        texts = self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        return [self._clean_up(text, clean_up_tokenization_spaces) for text in texts]

    def _clean_up(self, text: str, clean_up: bool | None) -> str:
        if clean_up is None:
            clean_up = self.clean_up_tokenization_spaces
        if not clean_up:
            return text
        if isinstance(self.backend.model, tokenizers.models.BPE):
            # As transformers 5.23 does: the rule was made for WordPiece output and would delete spaces
            # that a BPE vocabulary (Zamba2's) encodes as part of the text.
            if not self._warned_clean_up:
                logger.warning("%s: clean_up_tokenization_spaces=True is ignored for a BPE tokenizer", self.source)
                self._warned_clean_up = True
            return text
        return clean_up_tokenization_spaces(text)

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        **unsupported: Any,
    ) -> BatchEncoding:
        """Encode one text or a batch, in transformers' conventions: {"input_ids", "attention_mask"} as a
        BatchEncoding (a dict with attribute access and .to(device)).

        One text gives flat rows, a list of texts a row each. `return_tensors="pt"` gives (B, T) int64 tensors
        (rows must then be one length: pad them), None gives lists. `padding`: False, True / "longest",
        "max_length"; on `padding_side` (default self.padding_side, "left" unless tokenizer_config.json says
        otherwise), with pad_token, else eos_token, else unk_token. `truncation` cuts rows to `max_length`
        (default model_max_length) from `truncation_side`; like transformers, a max_length without padding
        truncates even when truncation is not given.
        """
        compat.reject("Tokenizer.__call__", unsupported, compat.TOKENIZER_CALL)
        if text_pair is not None:
            raise TypeError("Tokenizer.__call__: text_pair is not supported (Zamba2 has no pair template); "
                            "join the two texts into one")  # fmt: skip
        side = self.padding_side if padding_side is None else padding_side
        check_options(padding, truncation, return_tensors, side, self.truncation_side)
        single = isinstance(text, str)
        batch = [text] if single else list(text)
        if not batch or not all(isinstance(t, str) for t in batch):
            raise ValueError("text must be a string or a non-empty sequence of strings")
        if truncation is None:
            truncation = max_length is not None and padding in (False, "do_not_pad")
        if max_length is None and self.model_max_length is not None and self.model_max_length < NO_LIMIT:
            max_length = self.model_max_length
        specials = self._specials(add_special_tokens)
        cut = truncation not in (False, "do_not_truncate") and max_length is not None
        rows = [
            truncate(e.ids, specials, max_length, self.truncation_side) if cut else [*specials[0], *e.ids, *specials[1]]
            for e in self.backend.encode_batch(batch, add_special_tokens=False)
        ]
        pad_id = next((i for i in (self.pad_token_id, self.eos_token_id, self.unk_token_id) if i is not None), None)
        ids, mask = pad_batch(
            rows, padding=padding, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, pad_id=pad_id,
            side=side,
        )  # fmt: skip
        if return_tensors == "pt":
            return BatchEncoding(input_ids=as_tensors(ids, "input_ids"), attention_mask=as_tensors(mask, "mask"))
        if single:
            return BatchEncoding(input_ids=ids[0], attention_mask=mask[0])
        return BatchEncoding(input_ids=ids, attention_mask=mask)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write tokenizer.json and tokenizer_config.json so that from_pretrained (or transformers)
        reloads the same tokenizer."""
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        # Other readers of tokenizer.json add bos/eos through the post-processor: make it match ours.
        bos = [self.bos_token] if self.add_bos_token else []
        eos = [self.eos_token] if self.add_eos_token else []
        backend.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos],
            pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
            special_tokens=[(token, backend.token_to_id(token)) for token in {*bos, *eos}],
        )
        backend.save(str(root / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
        }
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # --- chat ----------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
    ) -> str | list[int] | torch.Tensor | BatchEncoding:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat template.

        Returns the prompt text, or its ids (without extra bos/eos: the template places those) when
        `tokenize` is true: a list, a (1, T) tensor with return_tensors="pt", or with `return_dict` a
        BatchEncoding like the tokenizer call's, as the model cards' transformers examples use it. (transformers
        5.23 defaults to tokenize=True, return_dict=True; these defaults are the older text-first ones.)
        The template runs in jinja2's immutable sandbox.
        """
        if (return_dict or return_tensors is not None) and not tokenize:
            raise ValueError("return_dict / return_tensors need tokenize=True")
        check_options(False, None, return_tensors, self.padding_side, self.truncation_side)
        if self.chat_template is None:
            raise ValueError(f"{self.source}: this tokenizer has no chat_template (tokenizer_config.json)")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"messages[{index}] must be a mapping with a string 'role', got {message!r}")
        try:
            if self._template is None:
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = _raise_from_template
                env.filters["tojson"] = lambda value, indent=None: json.dumps(
                    value, ensure_ascii=False, indent=indent
                )
                self._template = env.from_string(self.chat_template)
            text = self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except _TemplateRaised as exc:
            raise ValueError(f"{self.source}: chat_template rejected the messages: {exc}") from exc
        except TemplateError as exc:  # syntax errors, undefined names, sandbox SecurityError
            raise ValueError(f"{self.source}: chat_template failed: {type(exc).__name__}: {exc}") from exc
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        if return_dict:
            mask = [1] * len(ids)
            if return_tensors == "pt":
                return BatchEncoding(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask]))
            return BatchEncoding(input_ids=ids, attention_mask=mask)
        return torch.tensor([ids]) if return_tensors == "pt" else ids
