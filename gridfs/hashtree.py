"""Merkle trees over any number of leaves, their proofs, and a partial tree.

The tree is complete and binary: the leaves are padded with ``PAD_HASH`` up to
the next power of two P, and nodes are numbered heap-style::

                 0
           1            2
        3     4      5     6        leaf j is node P - 1 + j
       L0    L1     L2    L3

``node = H_node(left, right)``.  A *proof* (hash chain) for leaf j is the list
of sibling hashes from the leaf up to (not including) the root.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .errors import BadHashError, NotEnoughHashesError
from .hashes import HASH_SIZE, PAD_HASH, node_hash


def padded_leaves(num_leaves: int) -> int:
    """P: the number of leaf slots, a power of two ≥ num_leaves (at least 1)."""
    if num_leaves < 0:
        raise ValueError("num_leaves must be non-negative")
    return 1 << max(0, (num_leaves - 1).bit_length())


def depth(num_leaves: int) -> int:
    """Length of every proof in a tree of ``num_leaves`` leaves."""
    return padded_leaves(num_leaves).bit_length() - 1


def parent(i: int) -> int:
    return (i - 1) // 2


def sibling(i: int) -> int:
    return i + 1 if i % 2 else i - 1


def leaf_index(num_leaves: int, leafnum: int) -> int:
    if not 0 <= leafnum < num_leaves:
        raise IndexError(f"leaf {leafnum} out of range 0..{num_leaves - 1}")
    return padded_leaves(num_leaves) - 1 + leafnum


def build(leaves: Sequence[bytes]) -> list[bytes]:
    """Every node of the tree over ``leaves`` (leaf hashes), root first."""
    p = padded_leaves(len(leaves))
    nodes = [b""] * (p - 1) + list(leaves) + [PAD_HASH] * (p - len(leaves))
    for i in range(p - 2, -1, -1):
        nodes[i] = node_hash(nodes[2 * i + 1], nodes[2 * i + 2])
    return nodes


def root(leaves: Sequence[bytes]) -> bytes:
    return build(leaves)[0]


def proof_indices(num_leaves: int, leafnum: int) -> list[int]:
    """Node numbers of the proof for ``leafnum``, bottom-up."""
    i = leaf_index(num_leaves, leafnum)
    out = []
    while i:
        out.append(sibling(i))
        i = parent(i)
    return out


def proof(nodes: Sequence[bytes], num_leaves: int, leafnum: int) -> list[bytes]:
    return [nodes[i] for i in proof_indices(num_leaves, leafnum)]


def root_from_proof(
    leaf_hash: bytes, leafnum: int, num_leaves: int, chain: Sequence[bytes | memoryview]
) -> bytes:
    """The root implied by a leaf and its proof; compare it with a trusted root."""
    i = leaf_index(num_leaves, leafnum)
    if len(chain) != depth(num_leaves):
        raise BadHashError(f"proof has {len(chain)} hashes, expected {depth(num_leaves)}")
    cur = leaf_hash
    for sib in chain:
        sib = bytes(sib)
        cur = node_hash(sib, cur) if i % 2 == 0 else node_hash(cur, sib)
        i = parent(i)
    return cur


class PartialTree:
    """A hash tree known only in part, anchored at a trusted root.

    Hashes and leaves may arrive in any order and in as many calls as needed;
    they are held as *pending* until a chain of them reaches a trusted node, at
    which point the whole chain becomes trusted.  A value inconsistent with a
    trusted node raises :class:`BadHashError` and the call changes nothing.
    """

    def __init__(self, num_leaves: int, root_hash: bytes | None = None) -> None:
        if num_leaves < 1:
            raise ValueError("a tree needs at least one leaf")
        self.num_leaves = num_leaves
        self._p = padded_leaves(num_leaves)
        self._trusted: dict[int, bytes] = {}
        self._pending: dict[int, bytes] = {}
        self._trust_padding()
        if root_hash is not None:
            self.set_root(root_hash)

    def _trust_padding(self) -> None:
        first_pad = self._p - 1 + self.num_leaves
        level = list(range(first_pad, 2 * self._p - 1))
        for i in level:
            self._trusted[i] = PAD_HASH
        while level:
            parents = sorted({parent(i) for i in level if i and sibling(i) in self._trusted})
            level = []
            for q in parents:
                if q not in self._trusted:
                    self._trusted[q] = node_hash(self._trusted[2 * q + 1], self._trusted[2 * q + 2])
                    level.append(q)

    @property
    def root(self) -> bytes | None:
        return self._trusted.get(0)

    def set_root(self, root_hash: bytes) -> None:
        """Anchor the tree: ``root_hash`` comes from a source we trust (a cap)."""
        _check_hash(root_hash, 0)
        if 0 in self._trusted and self._trusted[0] != root_hash:
            raise BadHashError("root differs from the trusted root", 0)
        self._trusted[0] = root_hash

    def add(
        self,
        hashes: Mapping[int, bytes] | None = None,
        leaves: Mapping[int, bytes] | None = None,
    ) -> None:
        """Offer node hashes (by node number) and leaf hashes (by leaf number)."""
        new: dict[int, bytes] = {}
        for i, h in (hashes or {}).items():
            if not 0 <= i < 2 * self._p - 1:
                raise BadHashError(f"node {i} is outside a tree of {self.num_leaves} leaves", i)
            new[i] = _check_hash(h, i)
        for j, h in (leaves or {}).items():
            new[leaf_index(self.num_leaves, j)] = _check_hash(h, j)
        for i, h in new.items():
            if i in self._trusted and self._trusted[i] != h:
                raise BadHashError(f"hash for node {i} contradicts the trusted tree", i)
        saved = dict(self._pending)
        self._pending.update({i: h for i, h in new.items() if i not in self._trusted})
        try:
            for i in sorted(new, reverse=True):
                self._settle(i)
            self._descend()
        except _PathMismatch as e:
            # Nothing of this call is kept, nor the older unverified hashes that
            # took part in the failed chain (one of them is bad).
            self._pending = {j: h for j, h in saved.items() if j not in e.used}
            raise BadHashError(str(e), e.index) from None

    def _settle(self, i: int) -> None:
        """Walk up from pending node i; trust the path if it meets a trusted node."""
        if i in self._trusted or i not in self._pending:
            return
        cur, used = self._pending[i], [(i, self._pending[i])]
        while i:
            s = sibling(i)
            sib = self._trusted.get(s, self._pending.get(s))
            if sib is None:
                # Keep what was derived so a later sibling can continue from here.
                self._pending.update((j, h) for j, h in used if j not in self._trusted)
                return
            used.append((s, sib))
            cur = node_hash(sib, cur) if i % 2 == 0 else node_hash(cur, sib)
            i = parent(i)
            if i in self._trusted:
                if self._trusted[i] != cur:
                    raise _PathMismatch(i, {j for j, _ in used})
                for j, h in used:
                    self._trusted[j] = h
                    self._pending.pop(j, None)
                return
            used.append((i, cur))

    def _descend(self) -> None:
        """Trust pending pairs of children whose parent became trusted."""
        progress = True
        while progress:
            progress = False
            for i in sorted(self._pending):
                if i in self._trusted or parent(i) not in self._trusted:
                    continue
                s = sibling(i)
                sib = self._trusted.get(s, self._pending.get(s))
                if sib is None:
                    continue
                mine = self._pending[i]
                pair = node_hash(sib, mine) if i % 2 == 0 else node_hash(mine, sib)
                if pair != self._trusted[parent(i)]:
                    raise _PathMismatch(parent(i), {i, s})
                self._trusted[i] = self._pending.pop(i)
                if s in self._pending:
                    self._trusted[s] = self._pending.pop(s)
                progress = True

    def needed_hashes(self, leafnum: int) -> set[int]:
        """Node numbers still missing to verify ``leafnum`` (empty when it can be)."""
        i = leaf_index(self.num_leaves, leafnum)
        need = set()
        while i and i not in self._trusted:
            if sibling(i) not in self._trusted:
                need.add(sibling(i))
            i = parent(i)
        if i == 0 and 0 not in self._trusted:
            need.add(0)
        return need

    def leaf(self, leafnum: int) -> bytes:
        """The trusted hash of leaf ``leafnum``."""
        i = leaf_index(self.num_leaves, leafnum)
        if i not in self._trusted:
            raise NotEnoughHashesError(f"leaf {leafnum} is not verified yet")
        return self._trusted[i]

    def is_verified(self, leafnum: int) -> bool:
        return leaf_index(self.num_leaves, leafnum) in self._trusted


class _PathMismatch(Exception):
    def __init__(self, index: int, used: set[int]) -> None:
        super().__init__(f"hashes below node {index} do not match the trusted tree")
        self.index = index
        self.used = used


def _check_hash(h: bytes, where: int) -> bytes:
    if not isinstance(h, bytes) or len(h) != HASH_SIZE:
        raise BadHashError(f"hash for {where} is not {HASH_SIZE} bytes", where)
    return h
