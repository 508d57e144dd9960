#include "loop/status.h"

#include <gtest/gtest.h>

#include <cerrno>

namespace brokerproxy {
namespace {

TEST(StatusTest, OkIsDefaultAndCheap) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), Status::Code::kOk);
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_EQ(s.message(), "");
}

TEST(StatusTest, ErrorCarriesCodeAndMessage) {
  Status s = Status::NotFound("job 42");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Status::Code::kNotFound);
  EXPECT_EQ(s.message(), "job 42");
  EXPECT_EQ(s.ToString(), "not_found: job 42");
}

TEST(StatusTest, CopyIsDeepAndMoveLeavesOk) {
  Status a = Status::Corruption("bad byte");
  Status b = a;
  EXPECT_EQ(b.ToString(), a.ToString());
  Status c = std::move(a);
  EXPECT_EQ(c.code(), Status::Code::kCorruption);
  b = Status::OK();
  EXPECT_TRUE(b.ok());
  EXPECT_EQ(c.message(), "bad byte");
}

TEST(StatusTest, WithContextPrefixesMessage) {
  EXPECT_EQ(Status::IOError("disk full").WithContext("save").ToString(),
            "io_error: save: disk full");
  EXPECT_TRUE(Status::OK().WithContext("x").ok());
}

TEST(StatusTest, CodeNamesRoundTrip) {
  for (int i = 0; i <= static_cast<int>(Status::Code::kInternal); ++i) {
    auto code = static_cast<Status::Code>(i);
    auto back = Status::CodeFromName(Status::CodeName(code));
    ASSERT_TRUE(back.has_value()) << i;
    EXPECT_EQ(*back, code);
  }
  EXPECT_FALSE(Status::CodeFromName("no_such_code").has_value());
}

TEST(StatusTest, PosixErrorMapsErrno) {
  EXPECT_EQ(PosixError("open", ENOENT).code(), Status::Code::kNotFound);
  EXPECT_EQ(PosixError("open", EACCES).code(), Status::Code::kPermissionDenied);
  EXPECT_EQ(PosixError("connect", ECONNREFUSED).code(), Status::Code::kUnavailable);
  EXPECT_EQ(PosixError("write", EIO).code(), Status::Code::kIOError);
  EXPECT_NE(PosixError("write", EIO).message().find("write: "), std::string::npos);
}

TEST(ResultTest, HoldsValueOrError) {
  Result<int> good(7);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 7);
  Result<int> bad(Status::Timeout("slow"));
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Status::Code::kTimeout);
}

}  // namespace
}  // namespace brokerproxy
