#include "registry/control_protocol.h"

#include <gtest/gtest.h>

#include <cstdio>

namespace brokerproxy::registry {
namespace {

TEST(ControlProtocolTest, RequestsRoundTrip) {
  Request save;
  save.op = Op::kSave;
  save.job = "123.lab";
  save.save.id = "123.lab";
  save.save.type = JobType::kSsh;
  save.save.host = "node7";
  save.save.port = 8888;
  save.save.ttl = 3600;
  save.save.ready = false;
  Request verify;
  verify.op = Op::kVerify;
  verify.job = "j";
  verify.secret = "abcd";
  Request wait;
  wait.op = Op::kWait;
  wait.job = "j";
  wait.timeout_ms = 5000;
  for (const Request& r : {save, verify, wait}) {
    auto back = ParseRequest(EncodeRequest(r));
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(back->op, r.op);
    EXPECT_EQ(back->job, r.job);
    EXPECT_EQ(back->secret, r.secret);
    EXPECT_EQ(back->timeout_ms, r.timeout_ms);
    EXPECT_EQ(back->save.host, r.save.host);
    EXPECT_EQ(back->save.port, r.save.port);
    EXPECT_EQ(back->save.ttl, r.save.ttl);
    EXPECT_EQ(back->save.ready, r.save.ready);
    EXPECT_EQ(back->save.type, r.save.type);
  }
}

TEST(ControlProtocolTest, ReplaceAndConditionalRemoveRoundTrip) {
  Request save;
  save.op = Op::kSave;
  save.job = "12";
  save.save.id = "12";
  save.save.host = "node7";
  for (bool replace : {false, true}) {
    save.save.replace = replace;
    std::string line = EncodeRequest(save);
    EXPECT_EQ(line.find("replace") != std::string::npos, replace) << line;
    auto back = ParseRequest(line);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(back->save.replace, replace);
  }
  auto plain = ParseRequest(R"({"op":"remove","job":"12"})");
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  EXPECT_EQ(plain->secret, "");
  Request remove;
  remove.op = Op::kRemove;
  remove.job = "12";
  remove.secret = "00ff";
  auto back = ParseRequest(EncodeRequest(remove));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->op, Op::kRemove);
  EXPECT_EQ(back->secret, "00ff");
  remove.secret.clear();
  EXPECT_EQ(EncodeRequest(remove), R"({"op":"remove","job":"12"})");
}

TEST(ControlProtocolTest, RejectsBadRequestsWithAReason) {
  struct Case {
    const char* line;
    const char* mentions;
  } cases[] = {
      {"", "JSON"},
      {"nonsense", "JSON"},
      {"[]", "object"},
      {"{}", "op"},
      {"{\"op\":7}", "op"},
      {"{\"op\":\"fly\"}", "unknown op"},
      {"{\"op\":\"load\"}", "job"},
      {"{\"op\":\"load\",\"job\":\"a b\"}", "valid job id"},
      {"{\"op\":\"load\",\"job\":\"x\",\"extra\":1}", "unknown field"},
      {"{\"op\":\"load\",\"job\":\"x\",\"job\":\"y\"}", "twice"},
      {"{\"op\":\"save\",\"job\":\"x\",\"type\":\"ftp\",\"host\":\"h\"}", "type"},
      {"{\"op\":\"save\",\"job\":\"x\",\"type\":\"ssh\",\"host\":\"h\",\"port\":70000}", "port"},
      {"{\"op\":\"save\",\"job\":\"x\",\"type\":\"ssh\",\"host\":\"h\",\"port\":1.5}", "port"},
      {"{\"op\":\"save\",\"job\":\"x\",\"type\":\"ssh\",\"host\":\"-oProxy\"}", "host"},
      {"{\"op\":\"wait\",\"job\":\"x\",\"timeout\":-1}", "timeout"},
      {"{\"op\":\"query\"} trailing", "JSON"},
      // cJSON would cut the string at the NUL: "12\u0000x" must not read as "12".
      {"{\"op\":\"load\",\"job\":\"12\\u0000x\"}", "NUL"},
      {"{\"op\":\"verify\",\"job\":\"12\",\"secret\":\"ab\\u0000cd\"}", "NUL"},
      {"{\"op\":\"remove\",\"job\":\"12\",\"secret\":\"\"}", "secret"},
      {"{\"op\":\"remove\",\"job\":\"12\",\"secret\":7}", "secret"},
      {"{\"op\":\"load\",\"job\":\"12\",\"secret\":\"ab\"}", "unknown field"},
      {"{\"op\":\"save\",\"job\":\"x\",\"type\":\"ssh\",\"host\":\"h\",\"replace\":1}", "replace"},
  };
  for (const auto& c : cases) {
    auto r = ParseRequest(c.line);
    ASSERT_FALSE(r.ok()) << c.line;
    EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument) << c.line;
    EXPECT_NE(r.status().message().find(c.mentions), std::string::npos)
        << c.line << " -> " << r.status().ToString();
  }
  EXPECT_FALSE(ParseRequest(std::string(kMaxRequestBytes + 1, ' ')).ok());
}

TEST(ControlProtocolTest, RepliesCarryStatusCodes) {
  auto ok = ParseReply(EncodeOk(nullptr));
  EXPECT_TRUE(ok.ok());
  auto err = ParseReply(EncodeError(Status::PermissionDenied("not yours")));
  ASSERT_FALSE(err.ok());
  EXPECT_EQ(err.status().code(), Status::Code::kPermissionDenied);
  EXPECT_EQ(err.status().message(), "not yours");
  EXPECT_EQ(ParseReply("{\"ok\":false,\"code\":\"weird\"}").status().code(),
            Status::Code::kInternal);
  EXPECT_EQ(ParseReply("{\"ok\":\"yes\"}").status().code(), Status::Code::kIOError);
  EXPECT_EQ(ParseReply("<html>").status().code(), Status::Code::kIOError);
}

TEST(ControlProtocolTest, EncodeOkMovesTheBodyMembers) {
  JsonPtr body = NewObject();
  cJSON_AddNumberToObject(body.get(), "n", 3);
  cJSON_AddStringToObject(body.get(), "s", "x");
  EXPECT_EQ(EncodeOk(std::move(body)), "{\"ok\":true,\"n\":3,\"s\":\"x\"}");
}

// ---- ssl saves: the CSR and the paths where the client keeps its key ----

constexpr const char* kCsr =
    "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n";

TEST(ControlProtocolTest, SslSaveCarriesCsrAndPathsBothWays) {
  Request req;
  req.op = Op::kSave;
  req.job = "j1";
  req.save.id = "j1";
  req.save.type = JobType::kSsl;
  req.save.host = "node7";
  req.csr = kCsr;
  req.save.cert_path = "/home/u/.local/state/brokerproxy/certs/j1.crt";
  req.save.key_path = "/home/u/.local/state/brokerproxy/certs/j1.key";
  auto parsed = ParseRequest(EncodeRequest(req));
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(parsed->csr, kCsr);
  EXPECT_EQ(parsed->save.cert_path, req.save.cert_path);
  EXPECT_EQ(parsed->save.key_path, req.save.key_path);
  EXPECT_EQ(parsed->save.type, JobType::kSsl);
}

TEST(ControlProtocolTest, SslSaveNeedsAllThreeAndSshNone) {
  const char* base = R"({"op":"save","job":"j","type":"%s","host":"h"%s})";
  auto line = [&](const char* type, const std::string& extra) {
    char buf[1024];
    std::snprintf(buf, sizeof(buf), base, type, extra.c_str());
    return std::string(buf);
  };
  std::string all = R"(,"csr":"x","cert_path":"/a.crt","key_path":"/a.key")";
  EXPECT_TRUE(ParseRequest(line("ssl", all)).ok());
  EXPECT_TRUE(ParseRequest(line("ssh", "")).ok());
  for (const std::string& partial : {std::string(), std::string(R"(,"csr":"x")"),
                                     std::string(R"(,"csr":"x","cert_path":"/a.crt")"),
                                     std::string(R"(,"cert_path":"/a.crt","key_path":"/a.key")")}) {
    auto r = ParseRequest(line("ssl", partial));
    EXPECT_FALSE(r.ok()) << partial;
    EXPECT_EQ(r.status().code(), Status::Code::kInvalidArgument);
  }
  auto ssh = ParseRequest(line("ssh", all));
  ASSERT_FALSE(ssh.ok());
  EXPECT_NE(ssh.status().message().find("only for ssl jobs"), std::string::npos);
  EXPECT_FALSE(ParseRequest(line("ssl", R"(,"csr":1,"cert_path":"/a","key_path":"/b")")).ok());
}

}  // namespace
}  // namespace brokerproxy::registry
