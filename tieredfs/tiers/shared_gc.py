"""Keeping a shared namespace under its quota, at a bounded cost, with several collectors.

A pass never lists or stats every block file (a walk over NFS is slow). It reads only
what the nodes' journals gained since the last pass (their offsets are in the summary,
gc/state.json: every block's stored size and last use), evicts least recently used
blocks down to 90% of the quota, and looks into one fan-out directory (of 256) to remove
temp files left by crashed publishers and adopt block files no journal told of.

One collector at a time: a pass first takes gc/lease (O_EXCL, with an expiry); a busy
lease means another node is collecting and this pass is skipped. A lease whose holder
died is broken by renaming it aside (only one breaker's rename can succeed). Even two
passes at once (a lease that expired under a slow pass) are safe: each eviction is one
unlink, which succeeds for one of them only, and a block a stale summary still lists is
found gone (ENOENT) and dropped from it.
"""

import json
import logging
import os
import time
from pathlib import Path

from .shared_format import (TEMP_PREFIX, Layout, Perms, create_lease, decode, lease_expiry, node_name,
                            read_text, temp_name, write_atomic)

log = logging.getLogger(__name__)

LOW_WATER = 0.9
_JOURNAL_KEEP_S = 2 * 3600  # journals are per hour; older, consumed ones are deleted
_TEMP_AGE_S = 3600  # a temp file this old is a crashed publish
_READ_LIMIT = 64 << 20
# A block journaled this recently and not on disk yet is a publish in progress (journal
# line first, then the rename), not a lost one: it keeps counting against the quota.
_LANDING_S = 60  # journal bytes read per pass; the rest next pass


class Collector:
    def __init__(self, layout: Layout, perms: Perms, quota: int, lease_ttl: float = 120.0):
        self.layout = layout
        self.perms = perms
        self.quota = quota
        self.lease_ttl = lease_ttl
        self.lease_path = layout.gc / "lease"
        self.state_path = layout.gc / "state.json"
        self.token = f"{node_name()}-{os.urandom(4).hex()}"

    # --- the pass ------------------------------------------------------------------

    def run_pass(self, evict: bool = True, reserve: list[tuple[str, int]] = (),
                 journal=None, wait: float = 0.0) -> dict | None:
        """Collect once; None if another collector held the lease for `wait` seconds.

        `reserve`: blocks a node is about to publish. Room is made for them and their
        journal lines are written while the lease is held, so the next pass anywhere
        counts them: near the quota, publishes go through here, one node at a time."""
        give_up = time.monotonic() + wait
        while not self._take_lease():
            if time.monotonic() >= give_up:
                return None
            time.sleep(0.05)
        try:
            state = self.load_state()
            self._read_journals(state)
            report = {"evicted": 0, "evicted_bytes": 0, "already_gone": 0}
            room = sum(n for _, n in reserve)
            if evict:
                self._evict(state, report, room)
            if reserve and used(state) + room > self.quota:
                report["refused"] = True  # no room now: the node does not publish these
            elif reserve:
                journal.append(list(reserve))
                now = int(time.time())
                state["blocks"].update({block_id: [n, now] for block_id, n in reserve})
            self._sweep(state, report)
            state["quota"] = self.quota
            write_atomic(self.state_path, json.dumps(state).encode(), self.perms)
            report |= {"blocks": len(state["blocks"]), "bytes": used(state)}
            return report
        finally:
            self._drop_lease()

    def load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_bytes())
        except (FileNotFoundError, ValueError):
            state = {}
        return {"blocks": {}, "offsets": {}, "sweep_next": 0, **state}

    def _read_journals(self, state: dict) -> None:
        offsets, blocks = state["offsets"], state["blocks"]
        budget = _READ_LIMIT
        hits: dict[str, int] = {}  # applied after all journals: a read may be logged before
        # the publish it read (in another node's journal, read later)
        cutoff = time.strftime("%Y%m%d%H", time.gmtime(time.time() - _JOURNAL_KEEP_S))
        for name in sorted(os.listdir(self.layout.journal)):
            path = self.layout.journal / name
            start = offsets.get(name, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    chunk = f.read(budget)
            except FileNotFoundError:
                continue  # deleted by a collector whose lease expired under it
            budget -= len(chunk)
            whole = chunk[:chunk.rfind(b"\n") + 1]  # a line being appended is read next pass
            _apply(whole, blocks, hits)
            offsets[name] = start + len(whole)
            hour = name.rpartition(".")[2]
            if hour < cutoff and len(whole) == len(chunk):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                del offsets[name]
        for name in [n for n in offsets if not (self.layout.journal / n).exists()]:
            del offsets[name]
        for block_id, when in hits.items():
            if block_id in blocks:
                blocks[block_id][1] = max(blocks[block_id][1], when)

    def _evict(self, state: dict, report: dict, room: int = 0) -> None:
        blocks = state["blocks"]
        total = used(state)
        if total + room <= self.quota:
            return
        target = min(int(self.quota * LOW_WATER), self.quota - room)
        now = time.time()
        stop_at = now + self.lease_ttl / 2  # well within the lease
        for block_id in sorted(blocks, key=lambda b: blocks[b][1]):
            if total <= target or time.time() > stop_at:
                break
            size, when = blocks[block_id]
            try:
                os.unlink(self.layout.block(block_id))
                report["evicted"] += 1
                report["evicted_bytes"] += size
            except FileNotFoundError:
                if now - when < _LANDING_S:
                    continue  # reserved, its rename still to come: it stays counted
                report["already_gone"] += 1
            del blocks[block_id]
            total -= size

    def _sweep(self, state: dict, report: dict) -> None:
        """One fan-out dir per pass: crashed publishes' temp files, old leases, and block
        files the summary does not know (adopted with their size and modification time)."""
        sub = self.layout.fanout()[state["sweep_next"] % 256]
        state["sweep_next"] = (state["sweep_next"] + 1) % 256
        now = time.time()
        report["adopted"] = report["temps_removed"] = 0
        for entry in _scan(self.layout.blocks / sub):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # renamed or evicted meanwhile
            if entry.name.startswith(TEMP_PREFIX):
                if now - st.st_mtime > _TEMP_AGE_S:
                    _unlink(entry.path)
                    report["temps_removed"] += 1
            elif entry.name not in state["blocks"] and now - st.st_mtime > 60:
                state["blocks"][entry.name] = [st.st_size, int(st.st_mtime)]
                report["adopted"] += 1
        for entry in _scan(self.layout.leases / sub):
            try:
                if now - entry.stat().st_mtime > self.lease_ttl:
                    _unlink(entry.path)
            except FileNotFoundError:
                pass

    # --- the collector's lease ---------------------------------------------------------

    def _take_lease(self) -> bool:
        for _ in range(2):
            if create_lease(self.lease_path, self.token, self.lease_ttl, self.perms):
                return True
            if not self._break_dead_lease():
                return False
        return False

    def _break_dead_lease(self) -> bool:
        """Rename an expired lease aside and check it was the one judged expired: a fresh
        lease renamed by mistake (taken between the read and the rename) is put back."""
        seen = read_text(self.lease_path)
        expiry = lease_expiry(seen, self.lease_path, self.lease_ttl)
        if expiry is None:
            return True
        if time.time() < expiry:
            return False
        aside = self.layout.gc / temp_name()
        try:
            os.rename(self.lease_path, aside)
        except FileNotFoundError:
            return True
        if read_text(aside) != seen:
            try:
                os.link(aside, self.lease_path)  # fails if yet another lease exists: fine
            except OSError:
                pass
            _unlink(aside)
            return False
        _unlink(aside)
        log.info("event=shared_gc_lease_broken holder=%r", seen.split()[0] if seen.split() else None)
        return True

    def _drop_lease(self) -> None:
        seen = read_text(self.lease_path)
        if seen is not None and seen.split()[0] == self.token:
            _unlink(self.lease_path)


def _apply(lines: bytes, blocks: dict, hits: dict) -> None:
    for line in lines.decode(errors="replace").splitlines():
        parts = line.split()
        try:
            if parts[0] == "P" and len(parts) == 4:
                old = blocks.get(parts[1])
                blocks[parts[1]] = [int(parts[2]), max(int(parts[3]), old[1] if old else 0)]
            elif parts[0] == "H" and len(parts) == 3:
                hits[parts[1]] = max(hits.get(parts[1], 0), int(parts[2]))
        except (ValueError, IndexError):
            continue  # a torn line from a crashed node


def used(state: dict) -> int:
    return sum(size for size, _ in state["blocks"].values())


def _scan(path: Path):
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- `tieredfs shared info|check` (outside any daemon) -------------------------------------


def info(layout: Layout) -> dict:
    """Usage of one namespace from its summary plus the journal bytes not yet read: cheap."""
    c = Collector(layout, Perms(), 0)
    state = c.load_state()
    pending = 0
    for name in _names(layout.journal):
        try:
            pending += os.stat(layout.journal / name).st_size - state["offsets"].get(name, 0)
        except FileNotFoundError:
            pass
    return {"namespace": layout.namespace, "blocks": len(state["blocks"]), "bytes": used(state),
            "quota": state.get("quota"), "journal_bytes_unread": pending,
            "journals": len(_names(layout.journal)),
            "gc_running": c.lease_path.exists()}


def check(layout: Layout, drop: bool) -> dict:
    """Verify every block file (a full walk: slow on NFS, an operator's tool)."""
    checked, bad = 0, []
    for sub in layout.fanout():
        for entry in _scan(layout.blocks / sub):
            if entry.name.startswith(TEMP_PREFIX):
                continue
            checked += 1
            try:
                with open(entry.path, "rb") as f:
                    ident, _ = decode(f.read(), None)
                if ident.get("id") != entry.name:
                    raise ValueError("named for another block")
            except Exception as e:  # any failure to verify is a bad block, reported
                bad.append((entry.name, str(e)))
                if drop:
                    _unlink(entry.path)
    return {"namespace": layout.namespace, "checked": checked, "corrupt": len(bad),
            "dropped": len(bad) if drop else 0, "corrupt_ids": [f"{b} ({why})" for b, why in bad[:20]]}


def _names(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
