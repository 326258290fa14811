"""NITF header facts: ``sourceMetadata`` for features, TREs (RPC00B, ICHIPB) from GDAL's
``xml:TRE`` metadata domain."""

from __future__ import annotations

import xml.etree.ElementTree as ET  # noqa: S405 - parses GDAL's own metadata, not user XML
from datetime import UTC, datetime
from typing import Any

import numpy as np

#: NITF header fields → ``sourceMetadata`` keys
_FIELDS = {
    "NITF_IID1": "imageId",
    "NITF_IID2": "imageTitle",
    "NITF_ISORCE": "sensor",
    "NITF_ICAT": "imageCategory",
    "NITF_IREP": "imageRepresentation",
    "NITF_IC": "compression",
    "NITF_ABPP": "bitsPerPixel",
    "NITF_FTITLE": "fileTitle",
    "NITF_OSTAID": "originatingStation",
    "NITF_ONAME": "originator",
    "NITF_ISCLAS": "classification",
    "NITF_FHDR": "fileFormat",
    "NITF_TGTID": "targetId",
}


def _nitf_time(value: str) -> str | None:
    """NITF ``CCYYMMDDhhmmss`` → ISO 8601 UTC (None if it does not parse)."""
    try:
        return datetime.strptime(value.strip(), "%Y%m%d%H%M%S").replace(tzinfo=UTC).isoformat()
    except ValueError:
        return None


def source_metadata(tags: dict[str, str], driver: str = "NITF") -> dict[str, Any]:
    """The header facts that features carry as ``sourceMetadata`` (empty for non-NITF).

    The keys are always the same (absent values are None, TRE names one comma-separated
    string), so that the features of different images share one GeoParquet schema.
    """
    if driver != "NITF":
        return {}
    meta: dict[str, Any] = {}
    for key, name in _FIELDS.items():
        value = (tags.get(key) or "").strip()
        meta[name] = value if value and value.lower() not in ("unknown", "missing id") else None
    meta["sourceDT"] = _nitf_time(tags.get("NITF_IDATIM", ""))
    meta["tres"] = ",".join(sorted(k[4:] for k in tags if k.startswith("TRE_"))) or None
    return meta


def tre_fields(tre_xml: str, name: str) -> dict[str, Any] | None:
    """The fields of TRE ``name`` in a GDAL ``xml:TRE`` document (repeated groups as lists)."""
    root = ET.fromstring(tre_xml)  # noqa: S314 - GDAL's metadata
    for tre in root.iter("tre"):
        if tre.get("name") != name:
            continue
        fields: dict[str, Any] = {}
        for child in tre:
            if child.tag == "field":
                fields[child.get("name", "")] = child.get("value", "")
            elif child.tag == "repeated":
                fields[child.get("name", "")] = [
                    f.get("value", "") for f in child.iter("field")
                ]
        return fields
    return None


def rpc_from_tre_xml(tre_xml: str) -> dict[str, Any] | None:
    """RPC00B as a ``rasterio.rpc.RPC`` keyword dict (None without RPC00B)."""
    fields = tre_fields(tre_xml, "RPC00B")
    if fields is None:
        return None
    names = ("line_off", "samp_off", "lat_off", "long_off", "height_off",
             "line_scale", "samp_scale", "lat_scale", "long_scale", "height_scale")
    rpc: dict[str, Any] = {n: float(fields[n.upper()]) for n in names}
    for n in ("line_num_coeff", "line_den_coeff", "samp_num_coeff", "samp_den_coeff"):
        rpc[n] = [float(v) for v in fields[n.upper()]]
    rpc["err_bias"] = float(fields.get("ERR_BIAS", -1))
    rpc["err_rand"] = float(fields.get("ERR_RAND", -1))
    return rpc


def chip_transform(tre_xml: str) -> tuple[float, ...] | None:
    """ICHIPB's chip → full-image pixel affine ``(a, b, c, d, e, f)`` (None without ICHIPB).

    Fitted (least squares) to the four corner pairs ``OP_*`` (chip) → ``FI_*`` (full image);
    both use this package's pixel convention (pixel centres at ``.5``).
    """
    try:
        fields = tre_fields(tre_xml, "ICHIPB")
    except ET.ParseError:
        return None
    if fields is None:
        return None
    corners = ("11", "12", "21", "22")
    op = np.array([[float(fields[f"OP_COL_{c}"]), float(fields[f"OP_ROW_{c}"])] for c in corners])
    fi = np.array([[float(fields[f"FI_COL_{c}"]), float(fields[f"FI_ROW_{c}"])] for c in corners])
    design = np.column_stack([op, np.ones(4)])
    (a, b, c), *_ = np.linalg.lstsq(design, fi[:, 0], rcond=None)
    (d, e, f), *_ = np.linalg.lstsq(design, fi[:, 1], rcond=None)
    return tuple(float(v) for v in (a, b, c, d, e, f))
