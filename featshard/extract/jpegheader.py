"""Reading a JPEG's header (its markers up to the first scan) without decoding it: whether the device's batched
decoder reads it exactly as libjpeg would, or the CPU loaders must decode it."""
from __future__ import annotations

_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded: what nvJPEG batches on device
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every start-of-frame marker (DHT, JPG, DAC excluded)
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: markers without a length
_LUMA_SAMPLING = frozenset({(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 2)})  # 444 422 440 420 411 410, chroma 1x1
_RGB_IDS = (82, 71, 66)  # component ids "R", "G", "B": libjpeg reads such a file as RGB, not YCbCr


def device_decodable(data: bytes) -> bool:
    """Whether a JPEG's header (its markers up to the first scan) is one the device decodes in a batch as libjpeg
    does: one sequential Huffman frame, 8-bit, greyscale or YCbCr with 1x1 chroma and common luma sampling, no
    Adobe marker or component ids saying the samples are RGB, and Huffman tables libjpeg accepts."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    i, frame, adobe = 2, b"", -1
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF or marker in _STANDALONE:
            i += 1 if marker == 0xFF else 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        seg = data[i + 4: i + 2 + length]
        if length < 2 or len(seg) != length - 2:
            return False
        if marker == 0xDA:  # start of scan: the header is complete
            return bool(frame) and _frame_ok(frame, adobe)
        if marker in _SOF:
            if marker not in _SEQUENTIAL_HUFFMAN or frame:
                return False
            frame = seg
        elif marker == 0xC4 and not huffman_tables_ok(seg):
            return False
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        i += 2 + length
    return False


def _frame_ok(seg: bytes, adobe: int) -> bool:
    if len(seg) < 6:
        return False
    comps = seg[5]
    height, width = (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4]
    if seg[0] != 8 or not height or not width or len(seg) < 6 + 3 * comps:
        return False
    if comps == 1:
        return True
    if comps != 3 or adobe == 0 or tuple(seg[6 + 3 * k] for k in range(3)) == _RGB_IDS:
        return False
    sampling = [(seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15) for k in range(3)]
    return sampling[0] in _LUMA_SAMPLING and sampling[1] == sampling[2] == (1, 1)


def huffman_tables_ok(seg: bytes) -> bool:
    """A DHT segment's tables as libjpeg checks them: class 0/1, id 0-3, at most 256 symbols, DC symbols <= 15, and
    code lengths that fit (no length overflows its bits; the all-ones code stays unused)."""
    j = 0
    while j < len(seg):
        if j + 17 > len(seg) or seg[j] >> 4 > 1 or seg[j] & 15 > 3:
            return False
        counts = seg[j + 1: j + 17]
        total = sum(counts)
        if total > 256 or j + 17 + total > len(seg):
            return False
        if seg[j] >> 4 == 0 and any(v > 15 for v in seg[j + 17: j + 17 + total]):
            return False
        code = 0
        last = max((k for k in range(16) if counts[k]), default=-1)
        for k in range(last + 1):
            code += counts[k]
            if code >= 1 << (k + 1):
                return False
            code <<= 1
        j += 17 + total
    return True
