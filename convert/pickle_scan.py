"""Check a pickle's opcode stream before anything is built: protocol, sizes, memo, depth, sharing, end.

`pickletools.genops` decodes the opcodes without building any object (each declared length is read
from `_Reader`, which returns at most what the data holds, and genops refuses a short read). `scan`
then plays the unpickler's stack machine abstractly: every container or call result is a node with
edges to its children, every atom a marker. So, before `pickle` allocates, hashes or calls anything,
it can refuse what would crash, hang or balloon the real unpickler or a later walk of the result:

- pickle protocols 0 and 1 (no PROTO opcode first); protocol 2 loads (its bytes come through
  `_codecs.encode`, which the allowlist admits for latin-1 text only);
- more than MAX_OPCODES opcodes, bytes after STOP, a FRAME longer than the rest of the file;
- memo indices beyond the number of opcodes read so far (the C unpickler sizes its memo table by the
  index: a 9-byte file can ask for gigabytes) and fetches of unset entries;
- integers beyond 64 bits (their arithmetic, e.g. an array's size, can take minutes);
- dict keys that are not short strings and all sets (so no hash ever recurses into a nested or
  crafted object), out-of-band buffers, persistent ids and extension codes (checkpoints have none);
- containers nested deeper than MAX_DEPTH or in a cycle;
- a result whose tree (shared references counted each time they are reached) exceeds MAX_NODES, or
  calls (REDUCE, NEWOBJ, BUILD, ...) whose arguments' trees sum beyond MAX_CALL_WORK: a small DAG
  that is exponentially large as a tree ("billion laughs" through the memo or DUP) never gets built.
"""

from __future__ import annotations

import pickletools

MAX_OPCODES = 100_000  # the production checkpoint has 7,337 (~37 per array): 64 layers (~38,000) and 10,000
# metadata values fit; refusing at the bound takes ~0.1 s of CPU
MAX_DEPTH = 64  # container nesting; a checkpoint's deepest object (a jax array in the params tree) is 10
MAX_MARKS = 2 * MAX_DEPTH  # open MARKs: one per nesting level for batched items, one more for a call's args
MAX_NODES = 1_000_000  # the result as a tree (what any naive walk, repr or json.dumps of it would visit)
MAX_CALL_WORK = 1_000_000  # summed tree sizes of everything handed to a stand-in call
MAX_KEY_CHARS = 256  # dict keys are module and attribute names
MAX_INT = 2**64
PROTOCOLS = (2, 3, 4, 5)

# Atoms are negative markers; nodes (containers and call results) are indices >= 0.
_KEY, _STR, _ATOM, _GLOBAL = -1, -2, -3, -4
_STRINGS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_ATOMS = _INTS | {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE", "NEWFALSE",
                  "FLOAT", "BINFLOAT", "EMPTY_TUPLE"}
_PUTS, _GETS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}, {"GET", "BINGET", "LONG_BINGET"}
_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_PY2_STR = "a Python 2 str"
_REFUSED = {
    "EMPTY_SET": "a set", "FROZENSET": "a frozenset", "ADDITEMS": "a set",
    "PERSID": "a persistent id", "BINPERSID": "a persistent id",
    "EXT1": "an extension code", "EXT2": "an extension code", "EXT4": "an extension code",
    "NEXT_BUFFER": "an out-of-band buffer", "READONLY_BUFFER": "an out-of-band buffer",
    "STRING": _PY2_STR, "BINSTRING": _PY2_STR, "SHORT_BINSTRING": _PY2_STR,
}


_CALLS_TOO_BIG = f"calls whose arguments hold more than {MAX_CALL_WORK:,} objects as a tree (shared references)"
_TOO_BIG = f"an object of more than {MAX_NODES:,} items as a tree (shared references blow up)"


class _Reader:
    """A read-only file over `data` for genops: reads of 4 KiB or more are memoryview slices, not copies.

    genops reads every bytes payload (the weights: hundreds of MB); copying them made loading ~15% slower.
    Small reads stay bytes, which genops decodes. A read never returns more than the data holds.
    """

    def __init__(self, data: bytes):
        self.data, self.view, self.pos, self.size = data, memoryview(data), 0, len(data)

    def tell(self) -> int:
        return self.pos

    def read(self, n: int) -> bytes | memoryview:  # genops never asks for a negative n
        start = self.pos
        end = self.pos = start + n if start + n < self.size else self.size
        return self.data[start:end] if n < 4096 else self.view[start:end]

    def readline(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        start, self.pos = self.pos, len(self.data) if end < 0 else end + 1
        return self.data[start:self.pos]


class ScanRefused(Exception):
    """The stream holds something the loader refuses; the message says what and where."""


class _Machine:
    """The unpickler's stack, marks and memo over node ids, and the graph of nodes."""

    def __init__(self):
        self.stack: list[int] = []
        self.marks: list[int] = []
        self.memo: dict[int, int] = {}
        self.children: list[list[int]] = []  # node -> child nodes
        self.atoms: list[int] = []  # node -> number of atom children
        self.depth: list[int] = []  # node -> nesting depth (a lower bound while the scan runs)
        self.size: list[int] = []  # node -> tree size (a lower bound while the scan runs)
        self.calls: list[int] = []  # nodes whose tree is handed to a stand-in
        self.call_work = 0
        self.pos = 0

    def refuse(self, what: str):
        raise ScanRefused(f"{what} (at byte {self.pos})")

    def pop(self, n: int = 1) -> list[int]:
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) - n < floor:
            self.refuse("a malformed pickle: stack underflow")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def pop_mark(self) -> list[int]:
        if not self.marks:
            self.refuse("a malformed pickle: no MARK to pop to")
        items = self.stack[self.marks.pop():]
        del self.stack[len(self.stack) - len(items):]
        return items

    def top_node(self) -> int:
        if not self.stack or self.stack[-1] < 0:
            self.refuse("a malformed pickle: items added to something that is not a container")
        return self.stack[-1]

    def new(self, items: list[int], call: bool = False) -> int:
        node = len(self.children)
        self.children.append([])
        self.atoms.append(0)
        self.depth.append(1)
        self.size.append(1)
        self.add(node, items)
        if call:
            self.charge(node)
        return node

    def charge(self, node: int) -> None:
        """`node`'s tree goes to a stand-in call (REDUCE, NEWOBJ, OBJ, INST's arguments or BUILD's state)."""
        self.calls.append(node)
        self.call_work += self.size[node]
        if self.call_work > MAX_CALL_WORK:
            self.refuse(_CALLS_TOO_BIG)

    def add(self, node: int, items: list[int]) -> None:
        kids = [i for i in items if i >= 0]
        self.children[node] += kids
        self.atoms[node] += len(items) - len(kids)
        self.size[node] = min(MAX_NODES + 1, self.size[node] + len(items) - len(kids) + sum(self.size[k] for k in kids))
        if kids:
            self.depth[node] = max(self.depth[node], 1 + max(self.depth[k] for k in kids))
        if self.depth[node] > MAX_DEPTH:
            self.refuse(f"containers nested more than {MAX_DEPTH} deep")
        if self.size[node] > MAX_NODES:
            self.refuse(_TOO_BIG)

    def check_keys(self, keys: list[int]) -> None:
        if any(k != _KEY for k in keys):
            self.refuse(f"a dict key that is not a name (a string of at most {MAX_KEY_CHARS} characters)")


def _step(m: _Machine, name: str, arg, count: int) -> None:
    """One opcode's effect on the abstract machine."""
    if name in _STRINGS:
        m.stack.append(_KEY if len(arg) <= MAX_KEY_CHARS else _STR)
    elif name in _ATOMS:
        if name in _INTS and not -MAX_INT < arg < MAX_INT:
            m.refuse("an integer beyond 64 bits")
        m.stack.append(_ATOM)
    elif name in _PUTS:
        index = len(m.memo) if name == "MEMOIZE" else arg
        if not 0 <= index < count:
            m.refuse(f"memo index {index} beyond the {count} opcodes read so far")
        if not m.stack:
            m.refuse("a malformed pickle: a memo put with an empty stack")
        m.memo[index] = m.stack[-1]
    elif name in _GETS:
        if arg not in m.memo:
            m.refuse(f"a fetch of memo entry {arg}, which was never set")
        m.stack.append(m.memo[arg])
    elif name in _TUPLES:
        m.stack.append(m.new(m.pop(_TUPLES[name])))
    elif name in ("TUPLE", "LIST"):
        m.stack.append(m.new(m.pop_mark()))
    elif name in ("EMPTY_LIST", "EMPTY_DICT"):
        m.stack.append(m.new([]))
    elif name == "DICT":
        items = m.pop_mark()
        m.check_keys(items[::2])
        m.stack.append(m.new(items))
    elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS"):
        items = m.pop(1) if name == "APPEND" else m.pop(2) if name == "SETITEM" else m.pop_mark()
        if name.startswith("SETITEM"):
            m.check_keys(items[::2])
        m.add(m.top_node(), items)
    elif name == "MARK":
        if len(m.marks) >= MAX_MARKS:
            m.refuse(f"more than {MAX_MARKS} open MARKs (nesting too deep)")
        m.marks.append(len(m.stack))
    else:
        _step_rest(m, name, arg)


def _step_rest(m: _Machine, name: str, arg) -> None:
    """Calls, globals and stack manipulation."""
    if name in ("REDUCE", "NEWOBJ"):
        m.stack.append(m.new(m.pop(2), call=True))
    elif name == "NEWOBJ_EX":
        m.stack.append(m.new(m.pop(3), call=True))
    elif name in ("OBJ", "INST"):
        m.stack.append(m.new(m.pop_mark(), call=True))
    elif name == "BUILD":
        state = m.pop()
        m.add(m.top_node(), state)
        if state[0] >= 0:
            m.charge(state[0])
    elif name == "GLOBAL":
        m.stack.append(_GLOBAL)
    elif name == "STACK_GLOBAL":
        if m.pop(2) != [_KEY, _KEY]:
            m.refuse("a STACK_GLOBAL whose module and name are not short strings")
        m.stack.append(_GLOBAL)
    elif name == "DUP":
        m.stack += m.pop() * 2
    elif name == "POP":
        if m.marks and m.marks[-1] == len(m.stack):
            m.marks.pop()
        else:
            m.pop()
    elif name == "POP_MARK":
        m.pop_mark()
    elif name in _REFUSED:
        m.refuse(f"{_REFUSED[name]} ({name}), which checkpoints never contain")
    elif name == "PROTO":
        m.refuse("a second PROTO opcode")
    else:  # FRAME and STOP are handled by scan(); pickletools knows no other opcodes
        m.refuse(f"an unexpected {name} opcode")


def scan(data: bytes) -> None:
    """Refuse `data` (ScanRefused, or ValueError from pickletools for a malformed stream) unless it is safe."""
    try:
        _scan(data)
    except AttributeError:  # genops decodes a BINSTRING's payload, which _Reader hands over as a memoryview
        raise ScanRefused(f"{_PY2_STR} (BINSTRING), which checkpoints never contain") from None


def _scan(data: bytes) -> None:
    m, count, ops = _Machine(), 0, pickletools.genops(_Reader(data))
    for op, arg, pos in ops:
        m.pos, count = pos, count + 1
        if count > MAX_OPCODES:
            m.refuse(f"more than {MAX_OPCODES:,} opcodes")
        if count == 1:
            if op.name != "PROTO":
                m.refuse("a pickle of protocol 0 or 1 (no PROTO opcode first); this loader reads protocols "
                         "2 to 5: re-save the checkpoint with pickle.dump(obj, f, protocol=4)")
            if arg not in PROTOCOLS:
                m.refuse(f"pickle protocol {arg}; this loader reads protocols 2 to 5")
        elif op.name == "FRAME":
            if arg > len(data) - pos - 9:
                m.refuse(f"a FRAME of {arg:,} bytes with only {len(data) - pos - 9:,} left in the file")
        elif op.name == "STOP":
            if len(m.stack) != 1 or m.marks:
                m.refuse("a malformed pickle: STOP with other items still on the stack")
            if pos + 1 != len(data):
                m.refuse(f"trailing data after the pickle's STOP opcode ({len(data) - pos - 1:,} bytes: "
                         "a second pickle?)")
            _check_graph(m, m.stack[0])
            return
        else:
            _step(m, op.name, arg, count)
    raise ValueError("pickle exhausted before seeing STOP")  # genops stops at STOP; unreachable otherwise


def _check_graph(m: _Machine, root: int) -> None:
    """Exact depth and tree sizes now that every container is complete; refuse cycles."""
    n = len(m.children)
    state = bytearray(n)  # 0 unseen, 1 on the current path, 2 done
    depth, size = [0] * n, [0] * n
    for start in range(n):
        if state[start]:
            continue
        todo = [start]
        while todo:
            v = todo[-1]
            if state[v] == 0:
                state[v] = 1
                for c in m.children[v]:
                    if state[c] == 1:
                        m.refuse("a container that contains itself (a cycle)")
                    if state[c] == 0:
                        todo.append(c)
                continue
            todo.pop()
            if state[v] == 2:
                continue
            state[v] = 2
            kids = m.children[v]
            depth[v] = 1 + max((depth[c] for c in kids), default=0)
            size[v] = min(MAX_NODES + 1, 1 + m.atoms[v] + sum(size[c] for c in kids))
    if n and max(depth) > MAX_DEPTH:
        m.refuse(f"containers nested more than {MAX_DEPTH} deep")
    if root >= 0 and size[root] > MAX_NODES:
        m.refuse(_TOO_BIG)
    if sum(size[c] for c in m.calls) > MAX_CALL_WORK:
        m.refuse(_CALLS_TOO_BIG)
