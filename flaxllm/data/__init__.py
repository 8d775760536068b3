"""Data for flaxllm: TFDS source -> grain -> tokenize -> pack -> batches.

1. **Source** (:mod:`flaxllm.data.corpus`): a random-access TFDS data source in
   ArrayRecord format, read without TensorFlow. ``source='stdlib'`` (the default
   corpus: this interpreter's standard library ``*.py`` files) and
   ``source='text'`` (a directory or glob of text files) are built once by the
   ``flaxllm_text`` TFDS builder into ``$FLAXLLM_CACHE/tfds`` (default
   ``~/.cache/flaxllm``), split into train/validation by a hash of each file's
   path; ``source='tfds'`` opens a prepared catalog dataset by ``name`` and
   ``data_dir`` (e.g. ``c4`` in a bucket).
2. **Tokenizer** (:mod:`flaxllm.data.tokenizer`): :func:`get_tokenizer` gives a
   SentencePiece model (trained on the corpus and cached, or loaded from
   ``model_path``) or a byte tokenizer, behind one small :class:`Tokenizer`
   interface; :func:`check_vocab` compares it with the model's vocabulary.
3. **Pipeline** (:mod:`flaxllm.data.pipeline`): :func:`make_iterator` builds a
   grain pipeline: seeded global shuffle, this process's share of the data,
   tokenization with BOS/EOS, packing into ``seq_len`` rows with segment ids
   and positions (attention never crosses documents), batching, and an
   iterator whose JSON state can be checkpointed and restored exactly.

Example::

  tok = get_tokenizer({'kind': 'sentencepiece', 'vocab_size': 4096}, corpus={'source': 'stdlib'})
  it = make_iterator({'source': 'stdlib'}, tok, split='train', seq_len=512, batch_size=8, seed=0)
  batch = next(it)          # inputs, targets, segment_ids, positions, loss_mask: [8, 512]
  state = it.get_state()    # JSON-serialisable; it.set_state(state) resumes exactly
"""

from flaxllm.data.corpus import (
    BuiltCorpus,
    FlaxllmText,
    build_stdlib_corpus,
    build_text_corpus,
    cache_dir,
    open_split,
    plan_corpus,
    split_of,
)
from flaxllm.data.pipeline import (
    DOCUMENT_FORMATS,
    DataIterator,
    document_to_example,
    make_document,
    make_iterator,
    pack_documents,
    pack_examples,
    text_document,
)
from flaxllm.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    get_tokenizer,
)

__all__ = [
    "DOCUMENT_FORMATS",
    "BuiltCorpus",
    "ByteTokenizer",
    "DataIterator",
    "FlaxllmText",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_stdlib_corpus",
    "build_text_corpus",
    "cache_dir",
    "check_vocab",
    "document_to_example",
    "get_tokenizer",
    "make_document",
    "make_iterator",
    "open_split",
    "pack_documents",
    "pack_examples",
    "plan_corpus",
    "split_of",
    "text_document",
]
