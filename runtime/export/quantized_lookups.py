"""The token embedding's lookup in a quantized export: a table that a tied head's quantized MatMul
holds too is read from that MatMul's own quantized weight, and any other vocabulary-sized table
becomes int8 rows with a scale each, so no vocabulary-sized fp32 table is left in the file."""
from __future__ import annotations

import numpy as np

EMBEDDING_ELEMENTS = 1 << 20  # tables this large are a vocabulary's; a position table stays fp32
_CHUNK_ROWS = 8192  # rows compared at a time: a 256k-token table is not dequantized whole
_HALF_STEP = 0.51  # a weight rounded to the nearest step is within half a step of the table


def quantize_lookups(model, min_elements: int = EMBEDDING_ELEMENTS) -> int:
    """Both rewrites below, in place, tied tables first; returns how many tables they rewrote."""
    return share_tied_tables(model, min_elements) + quantize_embedding_lookups(model, min_elements)


def share_tied_tables(model, min_elements: int = EMBEDDING_ELEMENTS) -> int:
    """Each lookup (Gather) of a table [rows, dim] whose transpose a quantized MatMul multiplies by
    (a tied head: MatMulNBits in int4, MatMulInteger or DynamicQuantizeMatMul in int8) reads that
    MatMul's weight instead, and the table goes: int4 through onnxruntime's GatherBlockQuantized on
    the very blocks, scales and zero points the head uses; int8 by gathering the head's int8 columns,
    times its scale. The MatMul is recognised by its numbers, not its names: its weight must give the
    table back to within half a quantization step everywhere. Returns how many tables it rewrote."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    fresh = _name_maker(model)
    count = 0
    for name, (table, users) in _lookup_tables(model, min_elements).items():
        weights = numpy_helper.to_array(table)
        for node in model.graph.node:
            lookup = _int4_rows(node, initializers, weights) or _int8_columns(node, initializers, weights)
            if lookup is not None:
                break
        else:
            continue
        for gather in users:
            ids = gather.input[1]
            _replace(model, gather, lookup(model, ids, _rank(model, ids), gather.output[0], fresh))
        model.graph.initializer.remove(table)
        count += 1
    return count


def quantize_embedding_lookups(model, min_elements: int = EMBEDDING_ELEMENTS) -> int:
    """Gather(fp32 table [rows, dim], ids) -> Cast(Gather(int8 table, ids)) * Gather(row scales, ids),
    in place, for each table of at least `min_elements` that only Gathers read: symmetric int8 per
    row (scale max|row| / 127). Without it (or share_tied_tables) the fp32 table is the largest
    thing left in a quantized file: GPT-2's 50,257 x 768 is 147 MiB of a 269 MiB int8 bundle.
    Returns how many tables it rewrote."""
    from onnx import TensorProto, helper, numpy_helper

    fresh = _name_maker(model)
    count = 0
    for name, (table, users) in _lookup_tables(model, min_elements).items():
        weights = numpy_helper.to_array(table)
        scales = np.abs(weights).max(axis=1, keepdims=True) / 127.0
        scales[scales == 0] = 1.0  # an all-zero row: any scale gives zeros back
        rows = np.clip(np.rint(weights / scales), -127, 127).astype(np.int8)
        rows_name, scales_name = fresh(f"{name}.int8_rows"), fresh(f"{name}.row_scales")
        model.graph.initializer.remove(table)
        model.graph.initializer.extend([numpy_helper.from_array(rows, rows_name),
                                        numpy_helper.from_array(scales.astype(np.float32), scales_name)])
        for gather in users:
            out, ids = gather.output[0], gather.input[1]
            gathered, widened, row_scales = fresh(f"{out}.int8"), fresh(f"{out}.float"), fresh(f"{out}.scales")
            _replace(model, gather, [
                helper.make_node("Gather", [rows_name, ids], [gathered], axis=0, name=fresh(f"{out}.gather")),
                helper.make_node("Cast", [gathered], [widened], to=TensorProto.FLOAT, name=fresh(f"{out}.cast")),
                helper.make_node("Gather", [scales_name, ids], [row_scales], axis=0,
                                 name=fresh(f"{out}.gather_scales")),
                helper.make_node("Mul", [widened, row_scales], [out], name=fresh(f"{out}.dequantize"))])
        count += 1
    return count


def _lookup_tables(model, min_elements: int) -> dict[str, tuple]:
    """name -> (initializer, the Gathers that read it) for each fp32 table [rows, dim] of at least
    `min_elements` that nothing but row lookups (Gather on axis 0) reads."""
    from onnx import TensorProto

    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    fed = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    tables = {}
    for table in model.graph.initializer:
        users = readers.get(table.name, [])
        if (table.data_type == TensorProto.FLOAT and len(table.dims) == 2 and np.prod(table.dims) >= min_elements
                and users and table.name not in fed
                and all(u.op_type == "Gather" and u.input[0] == table.name and _axis(u) == 0 for u in users)):
            tables[table.name] = (table, users)
    return tables


def _int4_rows(node, initializers: dict, table: np.ndarray):
    """The lookup that reads `table`'s rows from this MatMulNBits's 4-bit blocks, or None when the
    node is not a plain 4-bit product by `table` transposed."""
    from onnx import helper, numpy_helper

    if node.op_type != "MatMulNBits" or len(node.input) < 3 or any(node.input[4:]):  # no g_idx, no bias
        return None
    attributes = {a.name: a.i for a in node.attribute}
    rows, dim = table.shape
    block = attributes.get("block_size", 0)
    if (attributes.get("bits") != 4 or attributes.get("N") != rows or attributes.get("K") != dim or not block
            or dim % block or any(n and n not in initializers for n in node.input[1:4])):
        return None
    packed, scales = (numpy_helper.to_array(initializers[n]) for n in node.input[1:3])
    blocks = dim // block
    if packed.dtype != np.uint8 or packed.shape != (rows, blocks, block // 2) or scales.dtype != np.float32 \
            or scales.size != rows * blocks:
        return None
    scales = scales.reshape(rows, blocks)
    if len(node.input) > 3 and node.input[3]:
        zero_points = numpy_helper.to_array(initializers[node.input[3]])
        if zero_points.dtype != np.uint8:
            return None
        zero_points = _nibbles(zero_points.reshape(rows, -1))[:, :blocks]
    else:
        zero_points = np.full((rows, blocks), 8, np.uint8)  # MatMulNBits' default
    for first in range(0, rows, _CHUNK_ROWS):
        part = slice(first, first + _CHUNK_ROWS)
        values = _nibbles(packed[part]).astype(np.float32) - zero_points[part, :, None]
        given = (values * scales[part, :, None]).reshape(-1, dim)
        if not (np.abs(given - table[part]) <= _HALF_STEP * np.repeat(scales[part], block, axis=1) + 1e-7).all():
            return None

    per_block: list[str] = []  # made at the first lookup (the first in the graph), shared by the others

    def lookup(model, ids: str, rank: int | None, out: str, fresh) -> list:
        made = []
        if not per_block:
            # GatherBlockQuantized wants scales and zero points of the data's rank, [rows, blocks, 1]:
            # the head's scales reshaped, and its zero points one to a byte (it packs two)
            per_block.extend((fresh(f"{node.input[2]}.per_block"), fresh(f"{node.input[1]}.zero_points_per_block")))
            shape = fresh(f"{node.input[2]}.block_shape")
            model.graph.initializer.extend([numpy_helper.from_array(np.array([rows, blocks, 1], np.int64), shape),
                                            numpy_helper.from_array(zero_points[..., None], per_block[1])])
            made.append(helper.make_node("Reshape", [node.input[2], shape], [per_block[0]],
                                         name=fresh(f"{node.input[2]}.reshape")))
        gathered = fresh(f"{out}.blocks")
        return [*made,
                helper.make_node("GatherBlockQuantized", [node.input[1], ids, *per_block], [gathered],
                                 domain="com.microsoft", bits=4, block_size=block, gather_axis=0, quantize_axis=2,
                                 name=fresh(f"{out}.gather_blocks")),
                *_reshape_to_rows(model, gathered, ids, rank, dim, out, fresh)]
    return lookup


def _int8_columns(node, initializers: dict, table: np.ndarray):
    """The lookup that reads `table`'s rows as columns of this int8 product's weight [dim, rows]
    (per-tensor scale and zero point), or None when the node is not such a product by `table` transposed."""
    from onnx import TensorProto, helper, numpy_helper

    if node.op_type not in ("MatMulInteger", "DynamicQuantizeMatMul") or node.input[1] not in initializers:
        return None
    rows, dim = table.shape
    weight = numpy_helper.to_array(initializers[node.input[1]])
    zero_name = node.input[3] if len(node.input) > 3 else ""
    if (weight.dtype not in (np.int8, np.uint8) or weight.shape != (dim, rows)
            or (zero_name and zero_name not in initializers)):
        return None
    zero = numpy_helper.to_array(initializers[zero_name]) if zero_name else np.zeros((), weight.dtype)
    if zero.size != 1:  # per-column scales: not this rewrite's case
        return None
    zero = float(zero.reshape(()))
    scale = _int8_scale(weight, zero, table)
    if scale is None:
        return None

    def lookup(model, ids: str, rank: int | None, out: str, fresh) -> list:
        """[dim, *ids] columns, dequantized, then transposed to rows (ids of unknown rank: flattened
        first, the rows then shaped like them)."""
        names = {key: fresh(f"{out}.{key}") for key in
                 ("flat", "scale", "zero", "ids", "columns", "float", "centred", "values", "rows")}
        constants = {"scale": np.array(scale, np.float32)} | ({"zero": np.array(zero, np.float32)} if zero else {})
        made = []
        if rank is None:
            constants["flat"] = np.array([-1], np.int64)
            made.append(helper.make_node("Reshape", [ids, names["flat"]], [names["ids"]],
                                         name=fresh(f"{out}.flatten_ids")))
        model.graph.initializer.extend(numpy_helper.from_array(v, names[k]) for k, v in constants.items())
        made += [helper.make_node("Gather", [node.input[1], names["ids"] if rank is None else ids], [names["columns"]],
                                  axis=1, name=fresh(f"{out}.gather_columns")),
                 helper.make_node("Cast", [names["columns"]], [names["float"]], to=TensorProto.FLOAT,
                                  name=fresh(f"{out}.cast"))]
        centred = names["float"]
        if zero:
            made.append(helper.make_node("Sub", [centred, names["zero"]], [names["centred"]],
                                         name=fresh(f"{out}.centre")))
            centred = names["centred"]
        made.append(helper.make_node("Mul", [centred, names["scale"]], [names["values"]],
                                     name=fresh(f"{out}.dequantize")))
        axes = rank or 1
        made.append(helper.make_node("Transpose", [names["values"]], [out if rank else names["rows"]],
                                     perm=[*range(1, axes + 1), 0], name=fresh(f"{out}.to_rows")))
        return made if rank else made + _reshape_to_rows(model, names["rows"], ids, None, dim, out, fresh)
    return lookup


def _int8_scale(weight: np.ndarray, zero: float, table: np.ndarray) -> np.float32 | None:
    """The scale with which `weight` [dim, rows] (less `zero`) gives `table` [rows, dim] back to within
    half a step everywhere, or None. A quantiser's own is its range over the integers' (symmetric:
    max|w| / 127); the least-squares fit covers one that rounds it otherwise."""
    def columns():
        for first in range(0, len(table), _CHUNK_ROWS):
            yield weight[:, first:first + _CHUNK_ROWS].T.astype(np.float64) - zero, table[first:first + _CHUNK_ROWS]

    extremes = np.array([[v.min(), v.max(), t.min(), t.max(), (v * t).sum(), (v * v).sum()] for v, t in columns()])
    low, high = extremes[:, 0].min(), extremes[:, 1].max()
    table_low, table_high = extremes[:, 2].min(), extremes[:, 3].max()
    candidates = [max(abs(table_low), abs(table_high)) / max(abs(low), abs(high), 1e-30),
                  (table_high - table_low) / max(high - low, 1e-30),
                  extremes[:, 4].sum() / max(extremes[:, 5].sum(), 1e-30)]
    for scale in (np.float32(c) for c in candidates if c > 0):
        if all((np.abs(v.astype(np.float32) * scale - t) <= _HALF_STEP * scale + 1e-7).all() for v, t in columns()):
            return scale
    return None


def _reshape_to_rows(model, values: str, ids: str, rank: int | None, dim: int, out: str, fresh) -> list:
    """Nodes giving `out` = `values` shaped [*ids' shape, dim]: one Reshape where the rank of `ids` is
    known (a 0 keeps that dim of `values`, whose leading dims are the ids'), else one to their Shape."""
    from onnx import helper, numpy_helper

    target = fresh(f"{out}.shape")
    if rank is not None:
        model.graph.initializer.append(numpy_helper.from_array(np.array([0] * rank + [dim], np.int64), target))
        return [helper.make_node("Reshape", [values, target], [out], name=fresh(f"{out}.reshape"))]
    width, shape = fresh(f"{out}.dim"), fresh(f"{out}.ids_shape")
    model.graph.initializer.append(numpy_helper.from_array(np.array([dim], np.int64), width))
    return [helper.make_node("Shape", [ids], [shape], name=fresh(f"{out}.shape_of_ids")),
            helper.make_node("Concat", [shape, width], [target], axis=0, name=fresh(f"{out}.row_shape")),
            helper.make_node("Reshape", [values, target], [out], name=fresh(f"{out}.reshape"))]


def _rank(model, name: str) -> int | None:
    """The rank the graph declares for value `name` (an input or an inferred value), or None."""
    for value in [*model.graph.input, *model.graph.value_info]:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return None


def _replace(model, node, made: list) -> None:
    """`made` in `node`'s place in the graph's (topological) node order."""
    at = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for offset, new in enumerate(made):
        model.graph.node.insert(at + offset, new)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., n] -> [..., 2n]: the 4-bit values each byte holds, low nibble first."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _name_maker(model):
    """fresh(name): `name`, or `name_2`, `name_3`, ... if the graph has it already (as a value, an
    initializer or a node); each name it gives is taken from then on."""
    taken = {i.name for i in model.graph.initializer} | {v.name for v in model.graph.input} | \
        {n.name for n in model.graph.node} | {x for n in model.graph.node for x in (*n.input, *n.output)}

    def fresh(name: str) -> str:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate)
        return candidate
    return fresh


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)
