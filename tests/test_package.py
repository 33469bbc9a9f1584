"""The package as installed: version, data files, where it is imported from."""
import importlib.metadata
import os

import mnistgan


def test_version_has_one_source():
    assert importlib.metadata.version("mnistgan") == mnistgan.__version__


def test_bundled_sample_and_attribution_are_installed():
    from mnistgan import data

    folder = data.PACKAGE_DATA / "mnist-sample"
    assert (folder / "train-images-idx3-ubyte.gz").is_file()
    assert "CC BY-SA 3.0" in (folder / "ATTRIBUTION.md").read_text()


def test_installed_package_is_the_one_under_test():
    # Set by wheels/install_test.sh: the wheel, not src/, must be imported.
    if os.environ.get("MNISTGAN_EXPECT_INSTALLED"):
        assert "site-packages" in mnistgan.__file__, mnistgan.__file__
        assert os.sep + "src" + os.sep not in mnistgan.__file__
