"""The checkpoint's tokenizer: loading, bos/eos handling, batching, chat template, streaming text.

`Tokenizer.from_pretrained(folder)` prefers `tokenizer.json` (read by the `tokenizers` library). A folder
with only a SentencePiece `tokenizer.model` (Mistral v0.1 / Llama style BPE) is converted here, without the
`sentencepiece` package: the ModelProto is read with a small protobuf wire-format reader and rebuilt as an
equivalent `tokenizers` BPE (byte fallback, "▁" for spaces plus a dummy prefix, merges ranked by piece
score). Plain text encodes and decodes exactly as SentencePiece does. Like transformers, special-token
strings in the text (e.g. "<s>", "<|im_start|>") encode as the special token, which chat templates rely on.

* sentencepiece.py: the ModelProto reader and its rebuild as a `tokenizers` BPE;
* config.py: tokenizer_config.json / special_tokens_map.json entries;
* core.py: `Tokenizer` (encode, decode, batches, chat template, save);
* stream.py: `StreamDecoder`, ids to text as they arrive.
"""

from zamba2.tokenizer.core import Tokenizer
from zamba2.tokenizer.sentencepiece import SentencePieceModel, read_sentencepiece_model
from zamba2.tokenizer.stream import StreamDecoder

__all__ = ["SentencePieceModel", "StreamDecoder", "Tokenizer", "read_sentencepiece_model"]
