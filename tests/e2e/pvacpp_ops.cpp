/*
 * pvacpp_ops: one PV Access operation with the pvAccessCPP client API (the
 * client library of pvapy, the C++ pvAccess command-line tools and QSRV1),
 * for the end-to-end tests of operations a server may not implement.
 *
 * Usage: pvacpp_ops PV OP [TIMEOUT]
 *   OP: process | array-get | array-length | putget=VALUE
 *   TIMEOUT: seconds for each step (connect, INIT, request), default 10
 *
 * The client is configured from the environment like every pvAccessCPP
 * client (EPICS_PVA_NAME_SERVERS, EPICS_PVA_ADDR_LIST, ...). It creates the
 * channel, waits for it to connect, creates the operation (the INIT round
 * trip: ChannelProcess, ChannelArray or ChannelPutGet), and when the INIT
 * succeeds issues the request once. It prints one JSON object:
 *   {"pv", "op", "connected", "connect_s",
 *    "init": "ok" | "error" | "timeout", "init_message", "init_s",
 *    "done": "ok" | "error" | "timeout" | null, "done_message", "result"}
 * where the times are seconds from the start of that step, and result is
 * the array's length and first elements, or the put-get's value.
 *
 * Build (headers from the epicscorelibs package, libraries from pvapy's:
 * the pvAccessCPP library in epicscorelibs 7.0.10.99.0.2 cannot use a name
 * server, pvapy's 7.1.8 can; both use the old C++ string ABI):
 *   g++ -std=c++11 -O2 -D_GLIBCXX_USE_CXX11_ABI=0 tests/e2e/pvacpp_ops.cpp \
 *       -I$EPICS/include -I$EPICS/include/os/Linux -I$EPICS/include/compiler/gcc \
 *       -L$PVAPY/lib/linux-x86_64 -lpvAccess -lpvData -lCom -pthread \
 *       -Wl,-rpath,$PVAPY/lib/linux-x86_64 -o pvacpp_ops
 * where $EPICS is epicscorelibs.path.base_path and $PVAPY the directory of
 * the pvaccess Python package. tests/e2e/test_pva_operations.py builds it.
 */
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>

#include <pv/clientFactory.h>
#include <pv/createRequest.h>
#include <pv/pvAccess.h>
#include <pv/pvData.h>

namespace pvd = epics::pvData;
namespace pva = epics::pvAccess;

namespace {

typedef std::chrono::steady_clock Clock;

double since(Clock::time_point t0)
{
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string json_string(const std::string &s)
{
    std::ostringstream out;
    out << '"';
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') {
            out << '\\' << c;
        } else if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out << buf;
        } else {
            out << c;
        }
    }
    out << '"';
    return out.str();
}

// One step's outcome, set once by a callback and awaited by main.
struct Step {
    std::mutex lock;
    std::condition_variable wake;
    bool done = false;
    bool ok = false;
    std::string message;
    std::string result = "null"; // JSON

    void set(const pvd::Status &status, const std::string &res = "null")
    {
        std::lock_guard<std::mutex> G(lock);
        if (done)
            return;
        done = true;
        ok = status.isSuccess();
        message = status.getMessage();
        result = res;
        wake.notify_all();
    }

    // "ok", "error" or "timeout"
    std::string wait(double timeout)
    {
        std::unique_lock<std::mutex> G(lock);
        wake.wait_for(G, std::chrono::duration<double>(timeout), [this] { return done; });
        if (!done)
            return "timeout";
        return ok ? "ok" : "error";
    }
};

struct Connector : public pva::ChannelRequester {
    Step connected;
    std::string getRequesterName() override { return "pvacpp_ops"; }
    void channelCreated(const pvd::Status &status, pva::Channel::shared_pointer const &) override
    {
        if (!status.isSuccess())
            connected.set(status);
    }
    void channelStateChange(pva::Channel::shared_pointer const &, pva::Channel::ConnectionState state) override
    {
        if (state == pva::Channel::CONNECTED)
            connected.set(pvd::Status::Ok);
    }
};

struct Process : public pva::ChannelProcessRequester {
    Step init, done;
    pva::ChannelProcess::shared_pointer op;
    std::string getRequesterName() override { return "pvacpp_ops process"; }
    void channelProcessConnect(const pvd::Status &status, pva::ChannelProcess::shared_pointer const &p) override
    {
        op = p;
        init.set(status);
    }
    void processDone(const pvd::Status &status, pva::ChannelProcess::shared_pointer const &) override
    {
        done.set(status);
    }
};

std::string array_json(pvd::PVArray::shared_pointer const &array)
{
    std::ostringstream out;
    out << "{\"length\": " << array->getLength() << ", \"head\": [";
    pvd::PVScalarArray::shared_pointer scalars = std::dynamic_pointer_cast<pvd::PVScalarArray>(array);
    if (scalars) {
        pvd::shared_vector<const double> values;
        scalars->getAs<double>(values);
        for (size_t i = 0; i < values.size() && i < 3; i++)
            out << (i ? ", " : "") << values[i];
    }
    out << "]}";
    return out.str();
}

struct Array : public pva::ChannelArrayRequester {
    Step init, done;
    pva::ChannelArray::shared_pointer op;
    std::string getRequesterName() override { return "pvacpp_ops array"; }
    void channelArrayConnect(const pvd::Status &status, pva::ChannelArray::shared_pointer const &a,
                             pvd::Array::const_shared_pointer const &) override
    {
        op = a;
        init.set(status);
    }
    void putArrayDone(const pvd::Status &status, pva::ChannelArray::shared_pointer const &) override
    {
        done.set(status);
    }
    void getArrayDone(const pvd::Status &status, pva::ChannelArray::shared_pointer const &,
                      pvd::PVArray::shared_pointer const &array) override
    {
        done.set(status, status.isSuccess() && array ? array_json(array) : "null");
    }
    void getLengthDone(const pvd::Status &status, pva::ChannelArray::shared_pointer const &, size_t length) override
    {
        done.set(status, "{\"length\": " + std::to_string(length) + "}");
    }
    void setLengthDone(const pvd::Status &status, pva::ChannelArray::shared_pointer const &) override
    {
        done.set(status);
    }
};

struct PutGet : public pva::ChannelPutGetRequester {
    Step init, done;
    pva::ChannelPutGet::shared_pointer op;
    pvd::Structure::const_shared_pointer put_type;
    std::string getRequesterName() override { return "pvacpp_ops putget"; }
    void channelPutGetConnect(const pvd::Status &status, pva::ChannelPutGet::shared_pointer const &p,
                              pvd::Structure::const_shared_pointer const &put,
                              pvd::Structure::const_shared_pointer const &) override
    {
        op = p;
        put_type = put;
        init.set(status);
    }
    void putGetDone(const pvd::Status &status, pva::ChannelPutGet::shared_pointer const &,
                    pvd::PVStructure::shared_pointer const &got, pvd::BitSet::shared_pointer const &) override
    {
        std::string res = "null";
        if (status.isSuccess() && got) {
            pvd::PVScalar::shared_pointer value = got->getSubField<pvd::PVScalar>("value");
            if (value)
                res = "{\"value\": " + json_string(value->getAs<std::string>()) + "}";
        }
        done.set(status, res);
    }
    void getPutDone(const pvd::Status &status, pva::ChannelPutGet::shared_pointer const &,
                    pvd::PVStructure::shared_pointer const &, pvd::BitSet::shared_pointer const &) override
    {
        done.set(status);
    }
    void getGetDone(const pvd::Status &status, pva::ChannelPutGet::shared_pointer const &,
                    pvd::PVStructure::shared_pointer const &, pvd::BitSet::shared_pointer const &) override
    {
        done.set(status);
    }
};

struct Report {
    std::string pv, op;
    bool connected = false;
    std::string connect_s = "null", init = "null", init_message, init_s = "null";
    std::string done = "null", done_message, result = "null";

    void print() const
    {
        std::printf("{\"pv\": %s, \"op\": %s, \"connected\": %s, \"connect_s\": %s, \"init\": %s, "
                    "\"init_message\": %s, \"init_s\": %s, \"done\": %s, \"done_message\": %s, "
                    "\"result\": %s}\n",
                    json_string(pv).c_str(), json_string(op).c_str(), connected ? "true" : "false",
                    connect_s.c_str(), init == "null" ? "null" : json_string(init).c_str(),
                    json_string(init_message).c_str(), init_s.c_str(),
                    done == "null" ? "null" : json_string(done).c_str(), json_string(done_message).c_str(),
                    result.c_str());
        std::fflush(stdout);
    }
};

std::string seconds(double s)
{
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3f", s);
    return buf;
}

// Waits for the INIT, then runs `request` and waits for its completion.
template <class R, class F>
void run(R &req, Report &rep, double timeout, Clock::time_point t0, F request)
{
    rep.init = req.init.wait(timeout);
    rep.init_s = seconds(since(t0));
    rep.init_message = req.init.message;
    if (rep.init != "ok" || !req.op)
        return;
    request();
    rep.done = req.done.wait(timeout);
    rep.done_message = req.done.message;
    rep.result = req.done.result;
}

} // namespace

int main(int argc, char *argv[])
{
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s PV process|array-get|array-length|putget=VALUE [TIMEOUT]\n", argv[0]);
        return 2;
    }
    Report rep;
    rep.pv = argv[1];
    rep.op = argv[2];
    double timeout = argc > 3 ? std::atof(argv[3]) : 10.0;

    pva::ClientFactory::start();
    pva::ChannelProvider::shared_pointer provider = pva::ChannelProviderRegistry::clients()->getProvider("pva");
    if (!provider) {
        std::fprintf(stderr, "no pva client provider\n");
        return 1;
    }
    auto connector = std::make_shared<Connector>();
    Clock::time_point t0 = Clock::now();
    pva::Channel::shared_pointer channel = provider->createChannel(rep.pv, connector);
    rep.connected = connector->connected.wait(timeout) == "ok";
    if (rep.connected)
        rep.connect_s = seconds(since(t0));
    if (!rep.connected) {
        rep.print();
        _exit(0);
    }

    // Kept alive until exit: pvAccessCPP holds its requesters weakly, and
    // releasing the returned operation cancels it.
    std::shared_ptr<void> keep, keep_op;
    t0 = Clock::now();
    if (rep.op == "process") {
        auto req = std::make_shared<Process>();
        keep = req;
        keep_op = channel->createChannelProcess(req, pvd::createRequest(""));
        run(*req, rep, timeout, t0, [&] { req->op->process(); });
    } else if (rep.op == "array-get" || rep.op == "array-length") {
        auto req = std::make_shared<Array>();
        keep = req;
        keep_op = channel->createChannelArray(req, pvd::createRequest("field(value)"));
        run(*req, rep, timeout, t0, [&] {
            if (rep.op == "array-get")
                req->op->getArray(0, 0, 1);
            else
                req->op->getLength();
        });
    } else if (rep.op.compare(0, 7, "putget=") == 0) {
        std::string value = rep.op.substr(7);
        rep.op = "putget";
        auto req = std::make_shared<PutGet>();
        keep = req;
        keep_op = channel->createChannelPutGet(req, pvd::createRequest("putField(value)getField(value)"));
        run(*req, rep, timeout, t0, [&] {
            pvd::PVStructure::shared_pointer put = pvd::getPVDataCreate()->createPVStructure(req->put_type);
            pvd::BitSet::shared_pointer changed(new pvd::BitSet(put->getNumberFields()));
            pvd::PVScalar::shared_pointer field = put->getSubField<pvd::PVScalar>("value");
            if (field) {
                field->putFrom<std::string>(value);
                changed->set(field->getFieldOffset());
            }
            req->op->putGet(put, changed);
        });
    } else {
        std::fprintf(stderr, "unknown operation %s\n", rep.op.c_str());
        return 2;
    }
    rep.print();
    // pvAccessCPP's teardown may wait on lost connections: the report is out.
    _exit(0);
}
