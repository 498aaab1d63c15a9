"""The SAE resource loads a registry release by name from an offline Hugging Face cache, as a user runs it."""

from pathlib import Path

import numpy as np
import pytest
from tests.support.sae import GS2_D_MODEL, FakeHubSae

from mosaic_dag.sae.resolve import check_target
from mosaic_dag.config import parse_config
from mosaic_dag.keys import TargetKey, targets
from mosaic_dag.sae.spec import SaeMismatchError
from resources import SaeResource


@pytest.mark.parametrize("fake_gemma_scope_2", [("gemma-scope-2-270m-pt-res", "layer_5_width_16k_l0_medium")],
                         indirect=True)
def test_registry_sae_through_the_resource(fake_gemma_scope_2: FakeHubSae, tmp_path: Path) -> None:
    fake = fake_gemma_scope_2
    cfg = parse_config({
        "data_dir": str(tmp_path),
        "models": [{"name": "gemma-3-270m", "id": "google/gemma-3-270m", "layers": [5],
                    "saes": [{"origin": "registry", "release": fake.release, "sae_id": fake.sae_id}]}],
        "datasets": [{"name": "d", "path": "x.csv"}],
    })
    target = targets(cfg)[0]
    assert target.key == "gemma-3-270m.L5.gs2-16k-medium"
    sae = SaeResource().load(cfg, target)
    np.testing.assert_array_equal(sae.state_dict()["W_enc"].numpy(), fake.params["w_enc"])
    info = check_target(cfg, target, "google/gemma-3-270m", GS2_D_MODEL)
    assert info.neuronpedia_id == "gemma-3-270m/5-gemmascope-2-res-16k"
    with pytest.raises(SaeMismatchError, match="sae 'gs2-16k-medium': sae layer=5"):
        check_target(cfg, TargetKey("gemma-3-270m", 6, target.sae), "google/gemma-3-270m", GS2_D_MODEL)
