"""The SecAgg+ neighbour graph: which peers each site masks with and shares its secrets to.

Bell et al. (CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead") replace
Bonawitz et al.'s complete graph by a sparse random one: each site masks with, and secret-shares to,
only `degree` neighbours, so the work per site grows with log N instead of N. Here the graph is a
Harary graph (the k-connected graph with the fewest edges) laid on a permutation of the sites that
`round_seed` fixes: a site at ring position i is joined to positions i +- 1 .. i +- floor(k/2), and for
odd k also to the position opposite it. With an odd number of sites an odd degree is rounded up
(the opposite of i is then two positions), and with degree >= N - 1 the graph is complete.

What it protects: every party that knows the roster and the seed derives the same graph, so the
server cannot hand two sites inconsistent neighbourhoods without the sites' views differing. What it
does not: the seed is chosen by the server (semi-honest model); a malicious server choosing the seed
to isolate a site is out of scope, as in SecAgg+ without its verifiable randomness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

#: Domain separation of the permutation hash from every other use of the round seed.
_PERMUTATION_DOMAIN = b"fedtrain/secagg/v1/neighbour-permutation\x00"


def _ring_order(sites: list[str], round_seed: bytes) -> list[str]:
    """The sites in the seeded order: sorted by SHA-256(domain, seed, name), ties impossible."""

    def position(site: str) -> bytes:
        return hashlib.sha256(_PERMUTATION_DOMAIN + round_seed + b"\x00" + site.encode()).digest()

    return sorted(sites, key=lambda site: (position(site), site))


def neighbours(sites: Iterable[str], round_seed: bytes, degree: int) -> dict[str, frozenset[str]]:
    """Each site's neighbours (never itself) in the seeded Harary graph of `degree`.

    Symmetric (v in result[u] iff u in result[v]) and deterministic in (set of sites, seed, degree).
    Every site has `degree` neighbours, `degree + 1` when both `degree` and the number of sites are odd,
    and all the others when `degree >= len(sites) - 1`.
    """
    names = list(dict.fromkeys(sites))
    if len(names) < 2:
        raise ValueError(f"a neighbour graph needs at least 2 sites, got {len(names)}")
    if degree < 1:
        raise ValueError(f"the degree must be >= 1, got {degree}")
    count = len(names)
    if degree >= count - 1:
        everyone = frozenset(names)
        return {site: everyone - {site} for site in names}
    order = _ring_order(names, round_seed)
    offsets = set(range(1, degree // 2 + 1))
    if degree % 2:
        offsets |= {count // 2, (count + 1) // 2}
    graph: dict[str, set[str]] = {site: set() for site in names}
    for index, site in enumerate(order):
        for offset in offsets:
            peer = order[(index + offset) % count]
            graph[site].add(peer)
            graph[peer].add(site)
    return {site: frozenset(peers) for site, peers in graph.items()}
