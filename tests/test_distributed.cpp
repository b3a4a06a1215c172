// styleinject/distributed.h on loopback Gloo: two ranks as two threads of
// this process, each with its own store connection and communicator, as two
// processes would have. (tests/distributed/ runs real processes.)

#include "support.h"

#include <styleinject/distributed.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <future>

namespace dist = styleinject::distributed;
using styleinject_test::error_of;

namespace {

/// A loopback TCP socket bound to a port of the kernel's pick; returns
/// the port.
int64_t bound_socket(int& fd) {
  fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  socklen_t length = sizeof address;
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  return ntohs(address.sin_port);
}

/// A TCP port that nothing listens on now.
int64_t free_port() {
  int fd = -1;
  const auto port = bound_socket(fd);
  close(fd);
  return port;
}

dist::Environment rank_of(int64_t rank, int64_t world_size, int64_t port) {
  dist::Environment env;
  env.rank = rank;
  env.world_size = world_size;
  env.local_rank = rank;
  env.master_port = port;
  return env;
}

dist::ProcessGroupOptions within(std::chrono::milliseconds timeout) {
  return dist::ProcessGroupOptions().timeout(timeout);
}

/// Runs `f(rank)` for ranks 0..n-1 at once, each on its own thread, and
/// returns what each threw ("no error" where none).
std::vector<std::string> on_ranks(
    int64_t n,
    const std::function<void(int64_t)>& f) {
  std::vector<std::future<std::string>> ranks;
  for (int64_t r = 0; r < n; ++r) {
    ranks.push_back(std::async(
        std::launch::async, [&f, r] { return error_of([&] { f(r); }); }));
  }
  std::vector<std::string> errors;
  for (auto& rank : ranks) {
    errors.push_back(rank.get());
  }
  return errors;
}

/// Parameters that differ per rank: float32 and float64 (two buckets).
std::vector<torch::Tensor> parameters_of(int64_t rank) {
  torch::manual_seed(100 + rank);
  return {
      torch::randn({3, 4}).requires_grad_(),
      torch::randn({5}, torch::kDouble).requires_grad_(),
      torch::randn({2, 1, 3}).requires_grad_()};
}

class ScopedVariable {
 public:
  ScopedVariable(const char* name, const char* value) : name_(name) {
    if (value == nullptr) {
      unsetenv(name);
    } else {
      setenv(name, value, 1);
    }
  }
  ~ScopedVariable() {
    unsetenv(name_);
  }

 private:
  const char* name_;
};

double seconds_since(std::chrono::steady_clock::time_point begin) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - begin)
      .count();
}

} // namespace

TEST_CASE(
    "two ranks: broadcast gives rank 0's values, gradients become the mean",
    "[distributed]") {
  const auto port = free_port();
  std::vector<std::vector<torch::Tensor>> params(2), grads(2);
  for (int64_t r = 0; r < 2; ++r) {
    params[r] = parameters_of(r);
    for (const auto& p : params[r]) {
      grads[r].push_back(torch::randn_like(p));
    }
  }
  // Rank 1 has no gradient for its last parameter: it counts as zeros.
  grads[1][2] = torch::Tensor();
  const auto rank0_values = parameters_of(0);
  dist::ProcessGroup groups[2];
  const auto errors = on_ranks(2, [&](int64_t r) {
    groups[r] = dist::ProcessGroup(
        rank_of(r, 2, port), torch::kCPU, within(std::chrono::seconds(30)));
    dist::broadcast_parameters(groups[r], params[r]);
    for (size_t i = 0; i < params[r].size(); ++i) {
      if (grads[r][i].defined()) {
        params[r][i].mutable_grad() = grads[r][i].clone();
      }
    }
    dist::average_gradients(groups[r], params[r]);
  });
  REQUIRE(errors == std::vector<std::string>{"no error", "no error"});
  for (int64_t r = 0; r < 2; ++r) {
    CHECK(groups[r].rank() == r);
    CHECK(groups[r].size() == 2);
    CHECK(groups[r].is_main() == (r == 0));
    for (size_t i = 0; i < params[r].size(); ++i) {
      CHECK(torch::equal(params[r][i], rank0_values[i]));
      // The naive mean, in float64.
      const auto zero = torch::zeros_like(grads[0][i]);
      const auto expected =
          (grads[0][i].to(torch::kDouble) +
           (grads[1][i].defined() ? grads[1][i] : zero).to(torch::kDouble)) /
          2;
      CHECK(params[r][i].grad().dtype() == params[r][i].dtype());
      CHECK(torch::allclose(
          params[r][i].grad().to(torch::kDouble), expected, 1e-6, 1e-7));
    }
    // Bytes: the broadcast and the all-reduce, each 12 + 6 float32 values
    // and 5 float64 ones.
    CHECK(groups[r].bytes_communicated() == 2 * (18 * 4 + 5 * 8));
  }
  // And the loss-printing helper.
  const auto means = on_ranks(2, [&](int64_t r) {
    const auto mean =
        dist::average(groups[r], torch::tensor({1.0 + r, 10.0 * r}));
    REQUIRE(torch::allclose(mean, torch::tensor({1.5, 5.0})));
  });
  CHECK(means == std::vector<std::string>{"no error", "no error"});
}

TEST_CASE(
    "a rank that hangs or dies stops the other within the timeout",
    "[distributed]") {
  const auto port = free_port();
  std::promise<void> release;
  auto released = release.get_future().share();
  double waited = 0;
  const auto errors = on_ranks(2, [&](int64_t r) {
    dist::ProcessGroup group(
        rank_of(r, 2, port), torch::kCPU, within(std::chrono::seconds(5)));
    auto params = parameters_of(r);
    if (r == 1) {
      released.wait(); // hangs where rank 0 all-reduces
      return;
    }
    for (auto& p : params) {
      p.mutable_grad() = torch::ones_like(p);
    }
    const auto begin = std::chrono::steady_clock::now();
    try {
      dist::average_gradients(group, params);
    } catch (...) {
      waited = seconds_since(begin);
      release.set_value();
      throw;
    }
    release.set_value();
  });
  CHECK(errors[1] == "no error");
  CHECK_THAT(
      errors[0],
      Catch::Contains(
          "styleinject::distributed (rank 0 of 2): the all-reduce of adapter "
          "gradients (18 values) failed: a rank died, hung for longer than "
          "the timeout (5000 ms) or left early: "));
  CHECK(waited >= 4.5);
  CHECK(waited < 30);
}

TEST_CASE(
    "rendezvous errors: other WORLD_SIZE, RANK twice, no master",
    "[distributed]") {
  SECTION("ranks disagree on WORLD_SIZE") {
    const auto port = free_port();
    // Rank 1 waits for a rank 2 that never comes: 5 s, enough for rank 0
    // to serve the store first on a loaded machine.
    const auto errors = on_ranks(2, [&](int64_t r) {
      dist::ProcessGroup(
          rank_of(r, r == 0 ? 2 : 3, port),
          torch::kCPU,
          within(std::chrono::seconds(r == 0 ? 30 : 5)));
    });
    CHECK_THAT(
        errors[0],
        Catch::Contains(
            "styleinject::distributed (rank 0 of 2): rank 1 was started with "
            "WORLD_SIZE=3, but this one with WORLD_SIZE=2; every rank must be "
            "started with the same WORLD_SIZE"));
    CHECK_THAT(
        errors[1],
        Catch::Contains(
            "styleinject::distributed (rank 1 of 3): not every rank joined "
            "within 5000 ms"));
  }
  SECTION("two processes with one RANK") {
    const auto port = free_port();
    // Kept until every thread is done, so that rank 0 still serves the
    // store when the later of the two rank-1 threads arrives.
    dist::ProcessGroup groups[3];
    const auto errors = on_ranks(3, [&](int64_t r) {
      groups[r] = dist::ProcessGroup(
          rank_of(std::min<int64_t>(r, 1), 2, port),
          torch::kCPU,
          within(std::chrono::seconds(30)));
    });
    INFO(errors[0] << " | " << errors[1] << " | " << errors[2]);
    CHECK(std::count_if(errors.begin(), errors.end(), [](const auto& e) {
            return e.find(
                       "another process was started with RANK=1; each rank "
                       "must be unique") != std::string::npos;
          }) == 1);
  }
  SECTION("a store that never answers") {
    // A socket that listens but never accepts: the kernel completes the
    // connection and nobody replies (LibTorch 1.13's client then waits in
    // recv without a timeout; 2.x's gives up itself).
    int fd = -1;
    const auto port = bound_socket(fd);
    REQUIRE(listen(fd, 8) == 0);
    const auto begin = std::chrono::steady_clock::now();
    const auto error = error_of([&] {
      dist::ProcessGroup(
          rank_of(1, 2, port), torch::kCPU, within(std::chrono::seconds(1)));
    });
    // fd stays open until the program ends: LibTorch 1.13's client, still
    // blocked on it, has a listener thread that a reset connection would
    // end with an uncaught exception (std::terminate).
    // LibTorch 2.x's client gives up itself ("failed: ..."), 1.13's is
    // given up by the watchdog ("did not answer within ...").
    CHECK_THAT(
        error,
        Catch::StartsWith(
            "styleinject::distributed (rank 1 of 2): the rendezvous store at "
            "MASTER_ADDR:MASTER_PORT = 127.0.0.1:" +
            std::to_string(port) + " took the connection, then "));
    CHECK(seconds_since(begin) < 20);
  }
  SECTION("nobody serves the store") {
    const auto port = free_port();
    const auto begin = std::chrono::steady_clock::now();
    const auto error = error_of([&] {
      dist::ProcessGroup(
          rank_of(1, 2, port), torch::kCPU, within(std::chrono::seconds(1)));
    });
    // Whatever c10d's own retries would do: its client is not called.
    CHECK(
        error ==
        "styleinject::distributed (rank 1 of 2): could not reach the "
        "rendezvous store at MASTER_ADDR:MASTER_PORT = 127.0.0.1:" +
            std::to_string(port) +
            " within 1000 ms: the connection was refused: nothing listens on "
            "that port");
    CHECK(seconds_since(begin) < 20);
  }
}

TEST_CASE(
    "one process: no communication; only trainable parameters",
    "[distributed]") {
  dist::ProcessGroup group;
  CHECK(group.size() == 1);
  CHECK(group.is_main());
  auto params = parameters_of(0);
  const auto before = params[0].detach().clone();
  params[0].mutable_grad() = torch::ones_like(params[0]);
  dist::broadcast_parameters(group, params);
  dist::average_gradients(group, params);
  CHECK(torch::equal(params[0], before));
  CHECK(torch::equal(params[0].grad(), torch::ones_like(params[0])));
  CHECK(!params[1].grad().defined());
  CHECK(group.bytes_communicated() == 0);

  auto frozen = params;
  frozen[1] = frozen[1].detach();
  CHECK(
      error_of([&] { dist::average_gradients(group, frozen); }) ==
      "styleinject::distributed::average_gradients: expected trainable "
      "parameters (the adapter's), but parameter 1 of shape [5] is frozen");
}

TEST_CASE("the environment, as torchrun sets it", "[distributed]") {
  const char* names[] = {
      "RANK",
      "WORLD_SIZE",
      "LOCAL_RANK",
      "MASTER_ADDR",
      "MASTER_PORT",
      "TORCHELASTIC_USE_AGENT_STORE",
      "TORCHELASTIC_RESTART_COUNT"};
  std::vector<std::unique_ptr<ScopedVariable>> cleared;
  for (const char* name : names) {
    cleared.push_back(std::make_unique<ScopedVariable>(name, nullptr));
  }
  SECTION("none: one process") {
    const auto env = dist::Environment::from_env();
    CHECK(env.rank == 0);
    CHECK(env.world_size == 1);
  }
  SECTION("all, as torchrun sets them") {
    ScopedVariable rank("RANK", "3"), size("WORLD_SIZE", "4"),
        local("LOCAL_RANK", "1"), addr("MASTER_ADDR", "10.0.0.2"),
        port("MASTER_PORT", "29400"),
        agent("TORCHELASTIC_USE_AGENT_STORE", "True"),
        restart("TORCHELASTIC_RESTART_COUNT", "2");
    const auto env = dist::Environment::from_env();
    CHECK(env.rank == 3);
    CHECK(env.world_size == 4);
    CHECK(env.local_rank == 1);
    CHECK(env.master_addr == "10.0.0.2");
    CHECK(env.master_port == 29400);
    CHECK(env.agent_store);
    CHECK(env.attempt == 2);
  }
  SECTION("set by hand, without LOCAL_RANK: the rank") {
    ScopedVariable rank("RANK", "1"), size("WORLD_SIZE", "2"),
        addr("MASTER_ADDR", "127.0.0.1"), port("MASTER_PORT", "29500");
    const auto env = dist::Environment::from_env();
    CHECK(env.local_rank == 1);
    CHECK(!env.agent_store);
  }
  SECTION("some missing") {
    ScopedVariable rank("RANK", "1"), size("WORLD_SIZE", "2");
    CHECK(
        error_of([] { dist::Environment::from_env(); }) ==
        "styleinject::distributed: RANK and WORLD_SIZE say this is one of "
        "several processes, which also needs RANK, WORLD_SIZE, MASTER_ADDR "
        "and MASTER_PORT (torchrun sets them all), but MASTER_ADDR, "
        "MASTER_PORT are not set");
  }
  SECTION("a rank beyond the world") {
    ScopedVariable rank("RANK", "2"), size("WORLD_SIZE", "2"),
        addr("MASTER_ADDR", "127.0.0.1"), port("MASTER_PORT", "29500");
    CHECK(
        error_of([] { dist::Environment::from_env(); }) ==
        "styleinject::distributed: expected RANK to be an integer in [0, 1], "
        "but got '2'");
  }
  SECTION("not a number") {
    ScopedVariable rank("RANK", "0"), size("WORLD_SIZE", "2"),
        addr("MASTER_ADDR", "127.0.0.1"), port("MASTER_PORT", "29500x");
    CHECK(
        error_of([] { dist::Environment::from_env(); }) ==
        "styleinject::distributed: expected MASTER_PORT to be an integer in "
        "[1, 65535], but got '29500x'");
  }
}
