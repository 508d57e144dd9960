// The control codec's `save` of ssl jobs: the CSR and the paths where the client keeps its key.

#include "registry/control_protocol.h"

#include <gtest/gtest.h>

namespace brokerproxy::registry {
namespace {

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
