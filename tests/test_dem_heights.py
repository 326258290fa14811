"""DEM heights for RPC geolocation: orthometric heights (a geoid's) become ellipsoidal where
the geoid grid is at hand, and are used as given, said so, where it is not.

No grid can be downloaded here, so the test writes its own geoid grid: a GeoTIFF under the
name PROJ looks for (EGM96's ``us_nga_egm96_15.tif``) holding a plane of known undulations,
in a data directory added to pyproj for the test only.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyproj
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from pipeline.reading import describe
from pipeline.sensor_models import sensor_model
from tests.conftest import shared_file

GROUND = 558.0  # the DEM's (orthometric) height everywhere


def undulation(lon: float, lat: float) -> float:
    """The test geoid: a plane, so the grid's bilinear interpolation is exact."""
    return 20.0 + 0.5 * (lon - 44.0) - 0.25 * (lat - 35.0)


@pytest.fixture
def geoid_grid(tmp_path):
    """EGM96's grid name, holding :func:`undulation` at its pixel centres (40° – 50°E, 30° – 40°N)."""
    res = 0.25
    lons = 40.0 + res * (np.arange(40) + 0.5)
    lats = 40.0 - res * (np.arange(40) + 0.5)
    values = np.array([[undulation(lon, lat) for lon in lons] for lat in lats], dtype=np.float32)
    folder = tmp_path / "proj"
    folder.mkdir()
    with rasterio.open(folder / "us_nga_egm96_15.tif", "w", driver="GTiff", width=40, height=40, count=1,
                       dtype="float32", crs="EPSG:4326", transform=from_origin(40, 40, res, res)) as out:
        out.write(values[None])
    before = pyproj.datadir.get_data_dir()
    pyproj.datadir.append_data_dir(str(folder))
    try:
        yield
    finally:
        pyproj.datadir.set_data_dir(before)


def write_dem(path, crs: str) -> str:
    """A constant DEM over the sample RPC image (lon 44.6 – 45.0, lat 35.7 – 36.1) in ``crs``."""
    if crs.startswith("EPSG:4326"):
        transform, size = from_origin(44.6, 36.1, 0.01, 0.01), 40
    else:  # UTM 38N: the same area in metres
        x, y = Transformer.from_crs("EPSG:4326", "EPSG:32638", always_xy=True).transform(44.6, 36.1)
        transform, size = from_origin(x - 2000, y + 2000, 100.0, 100.0), 480
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="float32",
                       crs=crs, transform=transform) as out:
        out.write(np.full((1, size, size), GROUND, dtype=np.float32))
    return str(path)


def offset_metres(a: tuple, b: tuple) -> np.ndarray:
    lon, lat = np.asarray(a[0]) - np.asarray(b[0]), np.asarray(a[1]) - np.asarray(b[1])
    return np.hypot(lon * 111_320 * math.cos(math.radians(35.9)), lat * 110_950)


@pytest.mark.parametrize("crs", ["EPSG:4326+5773", "EPSG:32638+5773"])
def test_orthometric_dem_heights_get_the_geoid_undulation(tmp_path, geoid_grid, crs) -> None:
    info = describe(str(shared_file("nitf/rpc/geocal_qb02_rpc.ntf")))
    centre = (info.rpcs["long_off"], info.rpcs["lat_off"])
    expected = undulation(*centre)  # about 20.3 m
    model = sensor_model(info, {"dem": write_dem(tmp_path / "dem.tif", crs)})
    facts = model.describe()
    assert facts["vertical"] == "orthometric" and facts["geoidApplied"] is True
    assert facts["verticalCrs"] == "EGM96 height" and facts["geoidAt"] == list(centre)
    assert facts["geoidOffset"] == pytest.approx(expected, abs=1e-6)
    # every DEM height is raised by the undulation: the same points as a constant ellipsoidal height
    x, y = np.array([0.0, 250.0, 500.0, 1000.0]), np.array([0.0, 700.0, 300.0, 1000.0])
    ellipsoidal = sensor_model(info, {"constant": GROUND + expected}).pixel_to_lonlat(x, y)
    as_given = sensor_model(info, {"constant": GROUND}).pixel_to_lonlat(x, y)
    assert offset_metres(model.pixel_to_lonlat(x, y), ellipsoidal).max() < 0.01
    assert offset_metres(as_given, ellipsoidal).min() > 1.0  # 20 m of height moves points


def test_without_the_geoid_grid_heights_are_used_as_given_and_said_so(tmp_path, caplog) -> None:
    from pyproj.transformer import TransformerGroup

    group = TransformerGroup("EPSG:4326+5773", "EPSG:4979", always_xy=True)
    if group.best_available:
        pytest.skip("this PROJ has the EGM96 grid")
    info = describe(str(shared_file("nitf/rpc/geocal_qb02_rpc.ntf")))
    with caplog.at_level(logging.WARNING, logger="pipeline.sensor_models"):
        model = sensor_model(info, {"dem": write_dem(tmp_path / "dem.tif", "EPSG:4326+5773")})
    facts = model.describe()
    assert facts["vertical"] == "orthometric" and facts["geoidApplied"] is False
    assert "us_nga_egm96_15.tif not found" in facts["reason"] and "geoidOffset" not in facts
    assert any("used as given" in r.getMessage() for r in caplog.records)
    x, y = np.array([0.0, 500.0]), np.array([0.0, 500.0])
    constant = sensor_model(info, {"constant": GROUND}).pixel_to_lonlat(x, y)
    assert offset_metres(model.pixel_to_lonlat(x, y), constant).max() < 0.01


def test_a_dem_without_a_vertical_crs_is_taken_as_ellipsoidal(tmp_path, geoid_grid) -> None:
    info = describe(str(shared_file("nitf/rpc/geocal_qb02_rpc.ntf")))
    model = sensor_model(info, {"dem": write_dem(tmp_path / "dem.tif", "EPSG:4326")})
    assert model.describe() == {"dem": str(tmp_path / "dem.tif"), "vertical": "unstated",
                                "assumed": "ellipsoidal"}
    x, y = np.array([0.0, 500.0]), np.array([0.0, 500.0])
    constant = sensor_model(info, {"constant": GROUND}).pixel_to_lonlat(x, y)
    assert offset_metres(model.pixel_to_lonlat(x, y), constant).max() < 0.01
