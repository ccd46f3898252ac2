"""The per-batch lifecycle of SparseLoRAState: begin_batch sets the split, pinned fixes it (and the head rows)."""

import pytest
import torch

from sparselora import SparseLoRAConfig
from sparselora.state import SparseLoRAState
from sparselora.tokens import split_tokens


def _state():
    return SparseLoRAState(SparseLoRAConfig(ffn_sparsity={0: 0.5}, start_step=0), arch=None, estimator=None)


def _labels():
    labels = torch.full((2, 6), -100)
    labels[:, 4:] = 7
    return labels


def test_begin_batch_splits_labelled_forwards_only():
    st = _state()
    assert st.begin_batch(None, None, None) is None and st.split is None
    split = st.begin_batch(_labels(), None, (2, 6))
    assert split is st.split and split.num_context == 8 and split.num_labelled == 4
    with pytest.raises(ValueError, match="one label per input token"):
        st.begin_batch(_labels(), None, (2, 5))
    st.enabled = False
    assert st.begin_batch(_labels(), None, (2, 6)) is None


def test_pinned_split_and_head_rows_are_used_then_cleared():
    st = _state()
    pinned = split_tokens(_labels(), None, (2, 6), bucket=4)
    assert st.head_rows is None
    with st.pinned(pinned, 8):
        assert st.head_rows == 8 and st.begin_batch(_labels(), None, (2, 6)) is pinned
        with pytest.raises(RuntimeError, match="already active"):
            with st.pinned(None, 1):
                pass
        st.enabled = False
        assert st.begin_batch(_labels(), None, (2, 6)) is None  # off: dense even when pinned
        st.enabled = True
    with st.pinned(None, 3):
        assert st.begin_batch(_labels(), None, (2, 6)) is None  # pinned dense
    with pytest.raises(KeyError):
        with st.pinned(pinned, 2):
            raise KeyError
    assert st.head_rows is None and st.begin_batch(_labels(), None, (2, 6)) is not pinned
    st.end_replay(pinned)
    assert st.split is pinned
