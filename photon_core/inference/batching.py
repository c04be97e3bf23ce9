"""Serving several users: asks that arrive together run as ONE batched forward.

    batcher = AskBatcher(predictor, window_s=0.005, max_rows=8)
    answers = batcher.ask([Query(question, budget, (features, grid_thw), prior)], max_new_tokens=32)

Any thread may call `ask`; it blocks until its answers are ready. One worker thread owns the model:
it takes the first waiting ask, collects whatever else arrives within ``window_s`` (asks that queued
while the previous batch ran are taken at once), groups the asks that can share a forward (same
visual token counts, decoding settings) into batches of at most ``max_rows`` rows — an ask's rows
(e.g. the Compare view's budgets) stay together — and answers each batch with `Predictor.answer`.
Every row gives exactly what it gives alone (the batched path's guarantee); each ask brings its own
volume's cached features, prior and budget. If a batch raises, its asks run one by one so that only
the faulty ask gets the error. Queue depth, wait and batch size are logged (logger
``photon_core.inference.batching``, INFO) and kept in `stats`.

A caller may follow its ask (``tick``: called every ``TICK_S`` while it waits, with where the ask is:
queued, reading — the prefill, with its decoder layer on a CPU —, or writing its n-th token) and give it
up by raising from ``tick``: a queued ask is then never run, and a batch whose every ask was given up
stops at its next decoder layer (CPU prefill) or decode step (an official model's answer takes most of
a minute on a CPU; nobody is left to read it).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from photon_core.inference.predictor import Answer, Predictor, Query

log = logging.getLogger(__name__)


TICK_S = 0.25                             # how often a waiting caller's ``tick`` is called


class GivenUp(RuntimeError):
    """The ask's caller gave it up: it was not run, or its batch was cut short (nobody read it)."""


@dataclass
class _Ask:
    queries: list[Query]
    settings: tuple                       # (max_new_tokens, do_sample, temperature, top_p, seed)
    tag: str
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)
    given_up: bool = False                # the caller no longer waits for it
    tokens: int | None = None             # None: queued; 0: reading (prefill); n: writing the n-th token
    layer: tuple | None = None            # reading: (decoder layer i, of n), where the CPU reports it

    def where(self) -> dict:
        """What a waiting caller is told: queued, reading, or writing (n of at most max_new_tokens)."""
        if self.tokens is None:
            return {"phase": "queued"}
        if self.tokens == 0:
            return {"phase": "reading"} | ({"layer": self.layer[0] + 1, "layers": self.layer[1]}
                                           if self.layer else {})
        return {"phase": "writing", "tokens": self.tokens, "max_new_tokens": self.settings[0]}

    @property
    def key(self) -> tuple:
        """Asks with equal keys can share a forward."""
        q = self.queries[0]
        return (q.prior[0].shape[0] if q.prior is not None else 0, q.volume[0].shape[0], self.settings)


class AskBatcher:
    def __init__(self, predictor: Predictor, window_s: float = 0.005, max_rows: int = 8):
        self.predictor = predictor
        self.window_s, self.max_rows = float(window_s), int(max_rows)
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.stats = dict(batches=0, asks=0, rows=0, max_rows=0, max_queue_depth=0, max_wait_s=0.0)

    # ------------------------------------------------------------------ callers
    def ask(self, queries: list[Query], max_new_tokens: int = 32, do_sample: bool | None = None,
            temperature: float | None = None, top_p: float | None = None, seed: int = 0,
            tag: str = "", tick=None) -> list[Answer]:
        """Answers of ``queries`` (rows of one ask, e.g. one question × several budgets), in order;
        decoding settings left None are the checkpoint's (`Predictor.answer`). ``tick(where)``: see the
        module's docstring; what it raises gives the ask up and is raised here."""
        if not queries:
            return []
        counts = {(q.prior[0].shape[0] if q.prior is not None else 0, q.volume[0].shape[0]) for q in queries}
        if len(counts) != 1:
            raise ValueError("the rows of one ask must carry the same visual token counts")
        if self._closed:
            raise RuntimeError("the ask batcher is closed")
        item = _Ask(list(queries), (int(max_new_tokens), do_sample, temperature, top_p, int(seed)), tag)
        self._ensure_worker()
        self._queue.put(item)
        if tick is None:
            return item.future.result()
        while True:
            try:
                return item.future.result(timeout=TICK_S)
            except FutureTimeout:
                try:
                    tick(item.where())
                except BaseException:
                    item.given_up = True
                    raise

    def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="photon-ask-batcher", daemon=True)
                self._worker.start()

    def _collect(self, first: _Ask) -> tuple[list[_Ask], bool]:
        """The first ask, those already queued, and those arriving within the window (up to max_rows)."""
        items, rows, stop = [first], len(first.queries), False
        deadline = time.perf_counter() + self.window_s
        while rows < self.max_rows:
            timeout = deadline - time.perf_counter()
            try:
                nxt = self._queue.get_nowait() if timeout <= 0 else self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if nxt is None:
                stop = True
                break
            items.append(nxt)
            rows += len(nxt.queries)
        return items, stop

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items, stop = self._collect(first)
            depth = self._queue.qsize()
            try:
                for batch in self._batches(items):
                    self._run(batch, depth)
            except BaseException as e:  # never leave a caller waiting on a dead worker
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(e)
            if stop:
                return

    def _batches(self, items: list[_Ask]) -> list[list[_Ask]]:
        groups: dict = {}
        for it in items:
            groups.setdefault(it.key, []).append(it)
        out = []
        for group in groups.values():
            cur, rows = [], 0
            for it in group:
                if cur and rows + len(it.queries) > self.max_rows:
                    out.append(cur)
                    cur, rows = [], 0
                cur.append(it)
                rows += len(it.queries)
            out.append(cur)
        return out

    def _run(self, batch: list[_Ask], depth: int) -> None:
        for it in batch:
            if it.given_up:
                it.future.set_exception(GivenUp("the ask was given up before it ran"))
                log.info("ask given up before it ran (%s)", it.tag or "-")
        batch = [it for it in batch if not it.given_up]
        if not batch:
            return
        t0 = time.perf_counter()
        waits = [t0 - it.arrived for it in batch]
        rows = [q for it in batch for q in it.queries]
        max_new_tokens, do_sample, temperature, top_p, seed = batch[0].settings

        def step(n: int) -> bool:               # the decode's progress; stop once nobody waits
            for it in batch:
                it.tokens = n
            return all(it.given_up for it in batch)

        def layer(i: int, n: int) -> None:      # the prefill's progress (CPU); stop once nobody waits
            for it in batch:
                it.layer = (i, n)
            if all(it.given_up for it in batch):
                raise GivenUp("the ask was given up while it ran")

        for it in batch:
            it.tokens = 0
        try:
            answers = self.predictor.answer(rows, max_new_tokens, do_sample, temperature, top_p, seed,
                                            on_step=step, on_layer=layer)
        except GivenUp as e:
            self._given_up(batch, e, time.perf_counter() - t0)
            return
        except Exception as e:  # noqa: BLE001 - find the faulty ask: the others still get answers
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            for it in batch:
                self._run([it], depth)
            return
        run_s = time.perf_counter() - t0
        if all(it.given_up for it in batch):
            self._given_up(batch, GivenUp("the ask was given up while it ran"), run_s)
            return
        i = 0
        for it, wait in zip(batch, waits):
            mine = answers[i:i + len(it.queries)]
            i += len(it.queries)
            for a in mine:
                a.extra.update(queue_wait_s=round(wait, 4), batch_asks=len(batch))
            it.future.set_result(mine)
        s = self.stats
        s.update(batches=s["batches"] + 1, asks=s["asks"] + len(batch), rows=s["rows"] + len(rows),
                 max_rows=max(s["max_rows"], len(rows)), max_queue_depth=max(s["max_queue_depth"], depth),
                 max_wait_s=max(s["max_wait_s"], max(waits)))
        log.info("ask batch: %d asks (%s), %d rows; %d still queued; waited %.1f ms max; forward %.0f ms",
                 len(batch), ", ".join(sorted({it.tag or "-" for it in batch})), len(rows), depth,
                 1000 * max(waits), 1000 * run_s)

    @staticmethod
    def _given_up(batch: list[_Ask], e: GivenUp, run_s: float) -> None:
        for it in batch:
            it.future.set_exception(e)
        log.info("ask batch given up by every caller (%s) after %.0f ms",
                 ", ".join(sorted({it.tag or "-" for it in batch})), 1000 * run_s)
