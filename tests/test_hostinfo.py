"""nerveseg_jax.hostinfo: the host a CPU figure was measured on."""

from nerveseg_jax import hostinfo

_LSCPU = """Architecture:                            x86_64
CPU(s):                                  2
Model name:                              AMD EPYC 9R14
CPU family:                              25
Model:                                   17
Flags:                                   fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni
"""


def test_parse_reads_model_family_and_the_flags_that_matter():
  h = hostinfo.parse(_LSCPU)
  assert (h["model_name"], h["family"], h["model"]) == ("AMD EPYC 9R14", "25", "17")
  assert h["flags"]["avx512f"] and h["flags"]["avx512_bf16"] and not h["flags"]["amx_bf16"]
  line = hostinfo.describe(h)
  assert "AMD EPYC 9R14 (family 25, model 17)" in line and "avx512_bf16" in line


def test_this_host_is_described_even_without_lscpu_fields():
  assert hostinfo.describe(hostinfo.parse(""))  # no crash: None fields, no flags
  h = hostinfo.cpu()
  assert set(h) == {"model_name", "family", "model", "flags", "cpus"}
