"""Whether a host really shares a datastore with the hosts already linked to it. Pure, no I/O.

Two hosts share a directory datastore when one of them read, in its directory, the token the other
one wrote there (agent/share_proof.py): the current token or the one before the last rotation (the
two reports may cross a rotation). A host without a proof (an older agent, an iSCSI datastore,
whose LUNs are shared by the target and not by the directory) is trusted by the marker's UUID, as
before; so is the first host of a datastore.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmshift.model.host import DatastoreProof


def read_token_of(reader: DatastoreProof, writer_host: str, writer: DatastoreProof) -> bool:
    token = reader.peers.get(writer_host)
    return token is not None and token in {writer.token, writer.previous} - {""}


def shares_with_linked(host: str, proof: DatastoreProof | None,
                       linked: Mapping[str, DatastoreProof | None]) -> bool:
    """``linked``: the other hosts that already see the datastore, with their proofs."""
    if proof is None or not linked:
        return True
    for other, theirs in linked.items():
        if theirs is None:
            return True  # an older agent's datastore: nothing to prove against
        if read_token_of(proof, other, theirs) or read_token_of(theirs, host, proof):
            return True
    return False
