import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridfs import hashtree
from gridfs.errors import BadHashError, NotEnoughHashesError


def leaves(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


@given(st.integers(1, 70), st.data())
def test_every_proof_verifies_and_only_its_leaf(num: int, data: st.DataObject) -> None:
    ls = leaves(num)
    nodes = hashtree.build(ls)
    j = data.draw(st.integers(0, num - 1))
    chain = hashtree.proof(nodes, num, j)
    assert len(chain) == hashtree.depth(num)
    assert hashtree.root_from_proof(ls[j], j, num, chain) == nodes[0]
    assert hashtree.root_from_proof(os.urandom(32), j, num, chain) != nodes[0]
    if num > 1:
        other = (j + 1) % num
        assert hashtree.root_from_proof(ls[j], other, num, chain) != nodes[0]


def test_single_leaf_tree_root_is_the_leaf() -> None:
    (leaf,) = leaves(1)
    assert hashtree.root([leaf]) == leaf
    assert hashtree.proof(hashtree.build([leaf]), 1, 0) == []


@given(st.integers(1, 40), st.randoms(use_true_random=False))
def test_partial_tree_accepts_pieces_in_any_order(num: int, rnd: random.Random) -> None:
    ls = leaves(num)
    nodes = hashtree.build(ls)
    tree = hashtree.PartialTree(num, nodes[0])
    pieces: list[tuple[str, int]] = []
    for j in range(num):
        pieces.append(("leaf", j))
        pieces += [("node", i) for i in hashtree.proof_indices(num, j)]
    rnd.shuffle(pieces)
    for kind, i in pieces:
        if kind == "leaf":
            tree.add(leaves={i: ls[i]})
        else:
            tree.add(hashes={i: nodes[i]})
    for j in range(num):
        assert tree.leaf(j) == ls[j]
        assert tree.needed_hashes(j) == set()


def test_partial_tree_rejects_inconsistent_leaf_and_keeps_state() -> None:
    ls = leaves(8)
    nodes = hashtree.build(ls)
    tree = hashtree.PartialTree(8, nodes[0])
    chain = dict(zip(hashtree.proof_indices(8, 3), hashtree.proof(nodes, 8, 3), strict=True))
    with pytest.raises(BadHashError):
        tree.add(hashes=chain, leaves={3: os.urandom(32)})
    assert not tree.is_verified(3)
    tree.add(hashes=chain, leaves={3: ls[3]})
    assert tree.leaf(3) == ls[3]
    # Now that the path is trusted, a contradicting hash is refused at once.
    with pytest.raises(BadHashError) as err:
        tree.add(hashes={chain_index: os.urandom(32) for chain_index in list(chain)[:1]})
    assert err.value.index == next(iter(chain))


def test_bad_pending_sibling_does_not_block_good_data() -> None:
    ls = leaves(4)
    nodes = hashtree.build(ls)
    tree = hashtree.PartialTree(4, nodes[0])
    sib = hashtree.proof_indices(4, 0)[0]
    tree.add(hashes={sib: os.urandom(32)})  # unverifiable yet: held as pending
    with pytest.raises(BadHashError):
        tree.add(leaves={0: ls[0]}, hashes={2: nodes[2]})
    tree.add(leaves={0: ls[0]}, hashes={sib: nodes[sib], 2: nodes[2]})
    assert tree.leaf(0) == ls[0]


def test_unverified_leaf_reports_missing_hashes() -> None:
    ls = leaves(5)
    nodes = hashtree.build(ls)
    tree = hashtree.PartialTree(5, nodes[0])
    tree.add(leaves={1: ls[1]})
    with pytest.raises(NotEnoughHashesError):
        tree.leaf(1)
    assert tree.needed_hashes(1) == set(hashtree.proof_indices(5, 1))
    # Leaf 4's sibling subtrees hold only padding, which is known in advance.
    assert tree.needed_hashes(4) == {1}


def test_malformed_hashes_rejected() -> None:
    tree = hashtree.PartialTree(4, os.urandom(32))
    with pytest.raises(BadHashError):
        tree.add(hashes={1: b"short"})
    with pytest.raises(BadHashError):
        tree.add(hashes={99: os.urandom(32)})
