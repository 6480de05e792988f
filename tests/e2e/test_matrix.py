"""The container port-mapping matrix (see matrix.py and docs/port-mapping-matrix.md).

The seed cases run without the shim and record what happens: they never
fail on the outcome. Every shim row is a test that must pass. The last
test prints the table and, after a full run, writes it into docs/.
"""

import harness as h
import matrix as m
import pytest

pytestmark = pytest.mark.usefixtures("netns_ok")


class Labs:
    """One lab at a time: the seed lab, then each shim site in turn."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.name = None
        self.lab = None
        self.error = None
        self.measured = {}  # shim case key -> None, or the error measuring it

    def get(self, name: str):
        if self.name != name:
            self.close()
            work = self.workdir / name
            work.mkdir(exist_ok=True)
            self.name = name  # a lab that failed to start is not retried
            try:
                self.lab = m.SeedLab(work) if name == "seed" else m.ShimSite(name, work)
            except Exception as e:
                self.error = e
        if self.error:
            raise RuntimeError(f"lab {name} did not start: {self.error}")
        return self.lab

    def close(self):
        if self.lab:
            self.lab.close()
        self.lab = None
        self.error = None


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    labs = Labs(tmp_path_factory.mktemp("matrix"))
    try:
        yield labs
    finally:
        labs.close()


@pytest.mark.parametrize("case", m.SEED_CASES, ids=lambda c: c.key)
def test_seed_case_is_measured_without_shim(labs, case, record_property):
    # A measurement: whether the clients reached the IOC or not, the outcome
    # goes into the table and is not required. What must not happen is that
    # the case could not be measured (an IOC that did not start, a client
    # that crashed): that fails here, after its row records the error.
    try:
        cells = m.measure_seed(labs.get("seed"), case)
    except Exception as e:
        cells = {row.key: m.Cell(False, f"error: {str(e).splitlines()[0][:120]}") for row in case.rows()}
        for key, cell in cells.items():
            m.RESULTS[key] = {"without": cell}
        raise
    for key, cell in cells.items():
        record_property(key, cell.text)


_CASE_OF = {row.key: case for case in m.SHIM_CASES for row in case.rows()}


@pytest.mark.parametrize("row", m.SHIM_ROWS, ids=lambda r: r.key)
def test_with_shim(labs, shim_bin, shim_help, row, record_property):
    case = _CASE_OF[row.key]
    if case.key not in labs.measured:
        labs.measured[case.key] = None
        try:
            base = 100.0 * (1 + m.SHIM_CASES.index(case))  # put values unique per case and phase
            m.measure_shim_case(labs.get(case.site), case, base)
        except Exception as e:
            labs.measured[case.key] = e
            for r in case.rows():
                error = m.Cell(False, f"error: {str(e).splitlines()[0][:120]}")
                m.RESULTS[r.key] = {"without": error, "with": error}
    if labs.measured[case.key]:
        raise labs.measured[case.key]
    lab = labs.lab
    res = m.RESULTS[row.key]
    record_property("without_shim", res["without"].text)
    record_property("with_shim", res["with"].text)
    alive = "alive" if lab.shim.alive() else f"DEAD ({lab.shim.proc.returncode})"
    where = f"{row.case} / {m.CLIENT_LABEL[row.client]}"
    assert res["with"].ok, f"{where}: {res['with'].text}; shim {alive}, log {lab.shim.log}"


def test_table_is_printed_and_written_with_every_row(capsys):
    """Print the table; after a full run, write it into docs/ and check the
    document holds every row with the outcome this run measured."""
    if not m.RESULTS:
        pytest.skip("no matrix row ran (run the whole module to get the table)")
    table = m.table()
    written = ""
    if m.complete():
        document = m.write_document().read_text()
        assert m.summary() in document and table in document
        assert "not run" not in table, "a row of a full run has no outcome"
        written = f"\nwritten to {m.DOC.relative_to(h.REPO)}"
    with capsys.disabled():
        print(f"\n\nPort-mapping matrix\n\n{m.summary()}\n\n{table}{written}\n")
