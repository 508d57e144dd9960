#include "registry/scheduler.h"

#include "registry/job.h"

namespace brokerproxy::registry {

const char* SchedulerTypeName(SchedulerType type) {
  switch (type) {
    case SchedulerType::kNone:
      return "none";
    case SchedulerType::kSlurm:
      return "slurm";
    case SchedulerType::kPbs:
      return "pbs";
  }
  return "unknown";
}

void JobTable::Add(SchedulerJob job) { jobs_.push_back(std::move(job)); }

const SchedulerJob* JobTable::Find(std::string_view id) const {
  std::string want = CanonicalJobId(id);
  for (const SchedulerJob& job : jobs_) {
    if (CanonicalJobId(job.id) == want) return &job;
  }
  for (const SchedulerJob& job : jobs_) {
    for (const std::string& alias : job.aliases) {
      if (CanonicalJobId(alias) == want) return &job;
    }
  }
  return nullptr;
}

namespace {

// Stands in until the command-line clients are wired: every listing fails, so every save is
// refused (never fail open) while existing registrations keep working.
class UnbuiltScheduler : public Scheduler {
 public:
  UnbuiltScheduler(loop::Loop* loop, SchedulerType type) : loop_(loop), type_(type) {}
  SchedulerType type() const override { return type_; }
  loop::Pending List(int64_t, Done done) override {
    std::string name = SchedulerTypeName(type_);
    return loop::Post(*loop_, [done = std::move(done), name] {
      done(Status::Unavailable(name + ": this build cannot ask " + name + " about its jobs"));
    });
  }

 private:
  loop::Loop* loop_;
  SchedulerType type_;
};

}  // namespace

std::unique_ptr<Scheduler> MakeScheduler(loop::Loop* loop, const SchedulerOptions& options) {
  if (options.type == SchedulerType::kNone) return nullptr;
  return std::make_unique<UnbuiltScheduler>(loop, options.type);
}

}  // namespace brokerproxy::registry
