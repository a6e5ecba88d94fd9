"""What a compiled XLA program moves between devices: collective bytes per execution, from HLO text.

XLA's cost analysis does not count loops, so this walks the optimised HLO itself: every
computation's execution count is the product of the trip counts of the while loops around it
(`known_trip_count` in the loop's backend config; a layer scan, a micro-batch scan or the
memory loss's block scan), and each collective's operand bytes are multiplied by it.
Asynchronous pairs count once (the -start op); `-done` ops move nothing new. Collectives over
groups of one device (a mesh axis of size 1 under shard_map) move nothing and are skipped.
"""

import collections
import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # unindented, ends with {
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPERAND_NAME = re.compile(r"%([\w.\-]+)")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(?:body|condition|to_apply|calls|branch_computations|called_computations)="
                      r"(?:\{([^}]*)\}|(%?[\w.\-]+))")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _array_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text)


def _parse(rhs: str) -> tuple[str, str, str]:
    """'TYPE op(operands), attrs' -> (type, op, operands)."""
    type_end = _closing(rhs, 0) + 1 if rhs.startswith("(") else rhs.index(" ")
    rest = rhs[type_end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return rhs[:type_end], rest, ""
    return rhs[:type_end], rest[:paren], rest[paren + 1:_closing(rest, paren)]


def _group_size(line: str) -> int | None:
    """Devices per replica group of a collective, when the HLO says (None: all devices)."""
    if match := _GROUPS_LIST.search(line):
        return len(match.group(1).split(","))
    if match := _GROUPS_IOTA.search(line):
        return int(match.group(1))
    if match := _GROUPS_MESH.search(line):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", match.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", match.group(2)))
    return None


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Operand bytes per collective kind for one execution of the program, loops counted."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match and not line[:1].isspace():
            current = match.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() and line.strip() != "}":
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    edges: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)  # caller -> (callee, times)
    callers: dict[str, int] = collections.defaultdict(int)
    for name, lines in computations.items():
        for line in lines:
            trip = _TRIP.search(line)
            for braced, single in _CALLEES.findall(line):
                for callee in (c.strip().lstrip("%") for c in (braced or single).split(",")):
                    if callee in computations:
                        is_body = re.search(rf"body=%?{re.escape(callee)}\b", line) is not None
                        edges[name].append((callee, int(trip.group(1)) if trip and is_body else 1))
                        callers[callee] += 1
    # Executions per computation, callers before callees (HLO call graphs are acyclic).
    counts: dict[str, int] = collections.defaultdict(int)
    counts[entry] = 1
    ready = [c for c in computations if callers[c] == 0]
    while ready:
        name = ready.pop()
        for callee, times in edges[name]:
            counts[callee] += counts[name] * times
            callers[callee] -= 1
            if callers[callee] == 0:
                ready.append(callee)

    types: dict[str, str] = {}
    ops: list[tuple[str, str, str, str]] = []  # (computation, op, operands, line)
    for name, lines in computations.items():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match:
                type_, op, operands = _parse(match.group(2))
                types[match.group(1)] = type_
                ops.append((name, op, operands, line))
    out = dict.fromkeys(COLLECTIVES, 0)
    for name, op, operands, line in ops:
        op = op.removesuffix("-start")
        if op in COLLECTIVES and _group_size(line) != 1:
            operand_bytes = sum(_array_bytes(types.get(o, "")) for o in _OPERAND_NAME.findall(operands))
            out[op] += counts[name] * operand_bytes
    return out
