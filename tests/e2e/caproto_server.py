"""A caproto CA server with the same PV layout as the test record databases.

  caproto_server.py --prefix CAPR: --interfaces 0.0.0.0 [--list-pvs]

ID holds the prefix (so a client can tell which server answered), VAL and
MSG are writable, COUNT counts up at 10 Hz and WAVE is a large DOUBLE array.
"""

from caproto import ChannelType
from caproto.server import PVGroup, ioc_arg_parser, pvproperty, run

WAVE_LEN = 100000


class TestServer(PVGroup):
    ID = pvproperty(value="", dtype=ChannelType.STRING, read_only=True)
    VAL = pvproperty(value=4.0, precision=3)
    MSG = pvproperty(value="hello from caproto", dtype=ChannelType.STRING)
    COUNT = pvproperty(value=0, read_only=True)
    WAVE = pvproperty(value=[0.0] * WAVE_LEN, max_length=WAVE_LEN)

    @ID.startup
    async def ID(self, instance, async_lib):
        await instance.write(self.prefix)

    @COUNT.scan(period=0.1)
    async def COUNT(self, instance, async_lib):
        await instance.write(instance.value + 1)


if __name__ == "__main__":
    ioc_options, run_options = ioc_arg_parser(default_prefix="CAPR:", desc=__doc__)
    run(TestServer(**ioc_options).pvdb, **run_options)
