"""Kernel struct member offsets from the running kernel's BTF.

fdpass never dereferences a kernel struct through header types: the headers
bcc compiles against may belong to another kernel (docs/kernel.md, "Struct
layouts"). Instead the collector reads /sys/kernel/btf/vmlinux with this small
parser, looks up each member it needs (following anonymous structs and
unions, as the compiler would), and hands the byte offsets to the BPF C as
#defines. That is CO-RE done in user space.

Only the parts of the BTF format that offsets need are decoded: the type
section is indexed once (about 0.1 s for ~130k types), structs are looked up
by name, members resolved on demand.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from fdpass.errors import UserError

# FDPASS_VMLINUX_BTF points at another BTF file (e.g. from BTFHub for kernels
# that do not expose their own).
VMLINUX_BTF = os.environ.get("FDPASS_VMLINUX_BTF", "/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
# BTF kinds (include/uapi/linux/btf.h)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes that follow the 12-byte common header, per kind: (fixed, per-vlen-item).
_TRAILER = {
    KIND_INT: (4, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0),
    KIND_ENUM64: (0, 12),
}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BTFError(UserError):
    pass


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # bytes from the start of the outer struct
    type_id: int


class BTF:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError("not a BTF blob (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._strings = hdr_len + str_off
        self._str_end = self._strings + str_len
        # _types[i] = offset of type id i's header (id 0 is void).
        self._types = [0]
        self._struct_by_name: dict[str, int] = {}
        self._enum_ids: list[int] = []
        self._func_by_name: dict[str, int] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.unpack_from
        while pos < end:
            name_off, info, _size = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            tid = len(self._types)
            self._types.append(pos)
            if (kind == KIND_STRUCT or kind == KIND_UNION) and name_off:
                # First definition wins; duplicates are rare and identical.
                self._struct_by_name.setdefault(self._str(name_off), tid)
            elif kind == KIND_ENUM or kind == KIND_ENUM64:
                self._enum_ids.append(tid)
            elif kind == KIND_FUNC and name_off:
                self._func_by_name.setdefault(self._str(name_off), tid)
            fixed, per = _TRAILER.get(kind, (0, 0))
            pos += 12 + fixed + per * vlen

    @classmethod
    def load(cls, path: str | None = None) -> "BTF":
        path = path or VMLINUX_BTF
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except FileNotFoundError:
            raise BTFError(
                f"{path} is missing: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF=y is needed; "
                "fdpass takes every kernel struct layout from it)"
            ) from None
        except PermissionError:
            raise BTFError(f"cannot read {path}: run as root") from None

    def _str(self, off: int) -> str:
        start = self._strings + off
        end = self._data.index(b"\0", start, self._str_end)
        return self._data[start:end].decode()

    def _header(self, tid: int) -> tuple[int, int, int, int, int]:
        pos = self._types[tid]
        name_off, info, size_or_type = struct.unpack_from("<III", self._data, pos)
        return pos, name_off, (info >> 24) & 0x1F, info & 0xFFFF, size_or_type | ((info >> 31) << 32)

    def _resolve(self, tid: int) -> int:
        """Skip typedefs and qualifiers."""
        for _ in range(32):
            _pos, _n, kind, _v, size_or_type = self._header(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = size_or_type & 0xFFFFFFFF
        raise BTFError(f"type {tid}: modifier chain too long")

    def _members(self, tid: int):
        pos, _n, kind, vlen, size_kflag = self._header(tid)
        kflag = size_kflag >> 32
        for i in range(vlen):
            m_name, m_type, m_off = struct.unpack_from("<III", self._data, pos + 12 + 12 * i)
            bit_off = m_off & 0xFFFFFF if kflag else m_off
            yield (self._str(m_name) if m_name else ""), m_type, bit_off

    def _find(self, tid: int, name: str) -> tuple[int, int] | None:
        """(bit offset, type id) of member `name`, searching anonymous members too."""
        for m_name, m_type, bit_off in self._members(tid):
            if m_name == name:
                return bit_off, m_type
            if not m_name:
                inner = self._resolve(m_type)
                if self._header(inner)[2] in (KIND_STRUCT, KIND_UNION):
                    found = self._find(inner, name)
                    if found:
                        return bit_off + found[0], found[1]
        return None

    def struct_id(self, name: str) -> int:
        try:
            return self._struct_by_name[name]
        except KeyError:
            raise BTFError(f"struct {name} is not in this kernel's BTF") from None

    def sizeof(self, struct_name: str) -> int:
        return self._header(self.struct_id(struct_name))[4] & 0xFFFFFFFF

    def bit_offsetof(self, struct_name: str, path: str) -> int:
        """Bit offset of a (dotted) member path; bitfields allowed."""
        tid = self.struct_id(struct_name)
        total = 0
        for part in path.split("."):
            found = self._find(tid, part)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {path} on this kernel")
            bit_off, m_type = found
            total += bit_off
            tid = self._resolve(m_type)
        return total

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of a (dotted) member path, e.g. offsetof('dentry', 'd_name.name')."""
        bits = self.bit_offsetof(struct_name, path)
        if bits % 8:
            raise BTFError(f"{struct_name}.{path} is a bitfield")
        return bits // 8

    def enum_value(self, name: str) -> int:
        """Value of an enumerator (e.g. IORING_OP_SENDMSG), from any enum of the kernel."""
        for tid in self._enum_ids:
            pos, _n, kind, vlen, _s = self._header(tid)
            step = 8 if kind == KIND_ENUM else 12
            for i in range(vlen):
                e_name, val = struct.unpack_from("<Ii", self._data, pos + 12 + step * i)
                if self._str(e_name) == name:
                    if kind == KIND_ENUM64:
                        lo, hi = struct.unpack_from("<II", self._data, pos + 12 + step * i + 4)
                        return lo | (hi << 32)
                    return val
        raise BTFError(f"enumerator {name} is not in this kernel's BTF")

    def has_member(self, struct_name: str, path: str) -> bool:
        try:
            self.offsetof(struct_name, path)
            return True
        except BTFError:
            return False

    def func_params(self, name: str) -> list[str] | None:
        """Parameter names of kernel function `name` (a BTF FUNC: what fentry/fexit
        can attach to), or None when the kernel has no such function (inlined,
        static and dropped, or renamed)."""
        tid = self._func_by_name.get(name)
        if tid is None:
            return None
        proto = self._header(tid)[4] & 0xFFFFFFFF
        pos, _n, kind, vlen, _s = self._header(proto)
        if kind != KIND_FUNC_PROTO:
            return None
        return [self._str(struct.unpack_from("<I", self._data, pos + 12 + 8 * i)[0]) for i in range(vlen)]
