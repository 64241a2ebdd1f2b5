"""Load the ahead-compiled kernel's object file (aot.py) into executable memory, without LLVM.

llvmlite's loader costs each worker process about 0.1 CPU s (the 100 MB LLVM library, its
initialisation, the JIT); this object needs far less. LLVM emits it for x86-64 with the large code
model, so its code refers to everything by absolute 64-bit address (R_X86_64_64): a relocatable
ELF file with a few sections, a handful of such relocations and one external symbol (memset). This
module copies the allocated sections into one anonymous mapping, reserves the COMMON symbols,
writes the relocated addresses, and makes the mapping read + execute (never writable and
executable at once). Anything else (another machine or ELF class, another relocation type, a
symbol outside ALLOWED, a section or offset out of range) raises NotLoadable, and aot.py loads
the object with llvmlite instead.
"""
from __future__ import annotations

import ctypes
import mmap
import struct

EM_X86_64 = 62
ET_REL = 1
SHT_SYMTAB, SHT_NOBITS, SHT_RELA, SHT_REL = 2, 8, 4, 9
SHF_ALLOC = 0x2
SHN_UNDEF, SHN_ABS, SHN_COMMON = 0, 0xFFF1, 0xFFF2
R_X86_64_NONE, R_X86_64_64 = 0, 1
PAGE = mmap.PAGESIZE


class NotLoadable(Exception):
    """The object is not one this loader handles (aot.py falls back to llvmlite)."""


class Loaded:
    """An object's code in memory (kept mapped while this lives): `address(symbol)`."""

    def __init__(self, memory: mmap.mmap, symbols: dict[str, int]):
        self._memory = memory
        self._symbols = symbols

    def address(self, name: str) -> int:
        if name not in self._symbols:
            raise NotLoadable(f"{name} is not defined in the object")
        return self._symbols[name]


def load(code: bytes, externals: dict[str, int]) -> Loaded:
    """Map `code` (an x86-64 ELF relocatable object); externals: the addresses of the undefined
    symbols it may use."""
    try:
        return _load(memoryview(code), externals)
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        raise NotLoadable(f"malformed object: {exc}") from None


def _load(data: memoryview, externals: dict[str, int]) -> Loaded:
    if bytes(data[:4]) != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit, little-endian
        raise NotLoadable("not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_type != ET_REL or e_machine != EM_X86_64:
        raise NotLoadable(f"ELF type {e_type}, machine {e_machine}: not an x86-64 relocatable object")
    (e_shoff,) = struct.unpack_from("<Q", data, 40)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 58)
    if e_shentsize != 64:
        raise NotLoadable("unexpected section header size")
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * 64) for i in range(e_shnum)]
    for _, kind, _, _, offset, size, *_ in sections:
        if kind != SHT_NOBITS and offset + size > len(data):
            raise NotLoadable("a section runs past the end of the file")

    # Layout: every allocated section at its alignment, then the COMMON symbols.
    placed: dict[int, int] = {}
    cursor = 0
    for index, (_, kind, flags, _, _, size, _, _, align, _) in enumerate(sections):
        if flags & SHF_ALLOC and size:
            cursor = _aligned(cursor, max(align, 1))
            placed[index] = cursor
            cursor += size
    symtab = [s for s in sections if s[1] == SHT_SYMTAB]
    if len(symtab) != 1:
        raise NotLoadable("expected one symbol table")
    _, _, _, _, sym_offset, sym_size, strtab_index, _, _, sym_entsize = symtab[0]
    if sym_entsize != 24:
        raise NotLoadable("unexpected symbol size")
    strings = sections[strtab_index]
    symbols = []
    for i in range(sym_size // 24):
        name_at, info, _, shndx, value, size = struct.unpack_from("<IBBHQQ", data, sym_offset + i * 24)
        symbols.append((_string(data, strings, name_at), info, shndx, value, size))
    commons: dict[int, int] = {}
    for i, (_, _, shndx, value, size) in enumerate(symbols):
        if shndx == SHN_COMMON:  # value: the alignment
            cursor = _aligned(cursor, max(value, 1))
            commons[i] = cursor
            cursor += size
    total = _aligned(max(cursor, 1), PAGE)

    memory = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    for index, at in placed.items():
        _, kind, _, _, offset, size, *_ = sections[index]
        if kind != SHT_NOBITS:
            memory[at : at + size] = data[offset : offset + size]

    def address_of(i: int) -> int:
        name, _, shndx, value, _ = symbols[i]
        if shndx == SHN_UNDEF:
            if name not in externals:
                raise NotLoadable(f"the object needs {name!r} from outside")
            return externals[name]
        if shndx == SHN_COMMON:
            return base + commons[i]
        if shndx == SHN_ABS:
            return value
        if shndx not in placed:
            raise NotLoadable(f"symbol {name!r} is in a section that is not loaded")
        return base + placed[shndx] + value

    for _, kind, _, _, offset, size, link, target, _, entsize in sections:
        if kind == SHT_REL:
            raise NotLoadable("REL relocations (without addends) are not handled")
        if kind != SHT_RELA or target not in placed:
            continue  # relocations of a section that is not loaded (debug info): nothing to do
        if entsize != 24 or sections[link] is not symtab[0]:
            raise NotLoadable("unexpected relocation table")
        section_size = sections[target][5]
        for r in range(size // 24):
            where, info, addend = struct.unpack_from("<QQq", data, offset + r * 24)
            kind_of, symbol = info & 0xFFFFFFFF, info >> 32
            if kind_of == R_X86_64_NONE:
                continue
            if kind_of != R_X86_64_64:
                raise NotLoadable(f"relocation type {kind_of} is not handled")
            if where + 8 > section_size:
                raise NotLoadable("a relocation outside its section")
            struct.pack_into("<Q", memory, placed[target] + where, (address_of(symbol) + addend) & (2**64 - 1))

    defined = {name: address_of(i) for i, (name, info, shndx, _, _) in enumerate(symbols)
               if name and info >> 4 == 1 and shndx not in (SHN_UNDEF, SHN_COMMON)}  # STB_GLOBAL
    _protect(base, total)
    return Loaded(memory, defined)


def _string(data: memoryview, strings: tuple, at: int) -> str:
    offset, size = strings[4], strings[5]
    if at >= size:
        raise NotLoadable("a name outside the string table")
    end = bytes(data[offset + at : offset + size]).index(b"\0")
    return bytes(data[offset + at : offset + at + end]).decode()


def _aligned(n: int, align: int) -> int:
    return -(-n // align) * align


def _protect(base: int, size: int) -> None:
    """Make the mapping read + execute (and no longer writable)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(base, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise NotLoadable(f"mprotect: errno {ctypes.get_errno()}")


def libc_address(name: str) -> int:
    """The address of a C library function in this process."""
    return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value
