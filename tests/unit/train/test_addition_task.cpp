// The embedded addition task (format, held-out separation, exact match) and
// the metrics writer and progress bar.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ctformer/train/addition_task.hpp"
#include "ctformer/train/metrics.hpp"

using namespace ctformer;
using train::addition_task;

TEST_CASE("problems are written with the answer least significant digit first", "[train][addition]") {
  const addition_task task(3);
  CHECK(task.sequence_length() == 13);
  CHECK(task.context_length() == 12);
  CHECK(task.prompt_length() == 8);
  CHECK(task.answer_length() == 5);
  CHECK(addition_task::to_text(task.encode(123, 456)) == "123+456=9750$");
  CHECK(addition_task::to_text(task.encode(999, 1)) == "999+001=0001$");
  CHECK(addition_task::to_text(task.encode(7, 8)) == "007+008=5100$");
  CHECK(addition_task::to_text(task.prompt(123, 456)) == "123+456=");
  CHECK(addition_task::from_text("123+456=9750$") == task.encode(123, 456));
  CHECK(addition_task::display(123, 456) == "123+456=579");
  const std::vector<std::int32_t> answer = {9, 7, 5, 0, addition_task::end_token};
  CHECK(addition_task::decode_answer(answer) == 579);
  CHECK(addition_task::decode_answer(std::vector<std::int32_t>{9, 7}) == -1);
  CHECK_THROWS_WITH(addition_task::from_text("12x"), Catch::Contains("'x'") && Catch::Contains("position 2"));
  CHECK_THROWS_AS(task.encode(1000, 1), invalid_input);
  CHECK_THROWS_AS(addition_task(0), invalid_input);
  CHECK_THROWS_AS(addition_task(10), invalid_input);
}

TEST_CASE("batches predict only the answer digits and the end token", "[train][addition]") {
  const addition_task task(3);
  std::mt19937_64 rng(1);
  const index_t b = 16, t = task.context_length();
  std::vector<std::int32_t> in(std::size_t(b * t)), tg(std::size_t(b * t));
  task.make_batch(rng, view(in.data(), b, t), view(tg.data(), b, t));
  for (index_t r = 0; r < b; ++r) {
    const auto row = std::span<const std::int32_t>(in.data() + r * t, std::size_t(t));
    const std::string text = addition_task::to_text(row);
    INFO(text);
    REQUIRE(text[3] == '+');
    REQUIRE(text[7] == '=');
    const std::uint64_t a = std::stoull(text.substr(0, 3)), bb = std::stoull(text.substr(4, 3));
    const auto full = task.encode(a, bb);
    for (index_t i = 0; i < t; ++i) {
      REQUIRE(in[std::size_t(r * t + i)] == full[std::size_t(i)]);
      const std::int32_t expected = i >= task.prompt_length() - 1 ? full[std::size_t(i + 1)] : -1;
      REQUIRE(tg[std::size_t(r * t + i)] == expected);
    }
    REQUIRE(tg[std::size_t(r * t + t - 1)] == addition_task::end_token);
  }
  std::vector<std::int32_t> wrong(std::size_t(b * 5));
  CHECK_THROWS_AS(task.make_batch(rng, view(wrong.data(), b, index_t(5)), view(wrong.data(), b, index_t(5))),
                  shape_error);
}

TEST_CASE("held-out problems never appear in training batches", "[train][addition]") {
  const addition_task task(2, 200);  // 10,000 problems, 200 held out (2%)
  REQUIRE(task.heldout_size() == 200);
  std::mt19937_64 rng(42);
  const index_t b = 256, t = task.context_length();
  std::vector<std::int32_t> in(std::size_t(b * t)), tg(std::size_t(b * t));
  std::size_t seen_distinct = 0;
  std::vector<bool> seen(10000);
  for (int draw = 0; draw < 200; ++draw) {  // 51,200 problems: each trainable one ~5 times
    task.make_batch(rng, view(in.data(), b, t), view(tg.data(), b, t));
    for (index_t r = 0; r < b; ++r) {
      const std::int32_t* row = in.data() + r * t;
      const std::uint64_t a = std::uint64_t(row[0] * 10 + row[1]), bb = std::uint64_t(row[3] * 10 + row[4]);
      REQUIRE_FALSE(task.is_heldout(a, bb));
      if (!seen[a * 100 + bb]) ++seen_distinct, seen[a * 100 + bb] = true;
    }
  }
  // Sampling still covers (nearly) every other problem.
  CHECK(seen_distinct > 9700);
  for (const auto& [a, bb] : task.heldout_problems()) CHECK_FALSE(seen[a * 100 + bb]);
}

TEST_CASE("the held-out set is fixed by its seed", "[train][addition]") {
  CHECK(addition_task(3, 50, 7).heldout_problems() == addition_task(3, 50, 7).heldout_problems());
  CHECK(addition_task(3, 50, 7).heldout_problems() != addition_task(3, 50, 8).heldout_problems());
  CHECK(addition_task(1, 1000).heldout_size() == 10);  // capped at a tenth of 100 problems
}

TEST_CASE("exact match: a perfect oracle scores 1, a wrong one 0", "[train][addition]") {
  const addition_task task(3, 300);
  auto oracle = [&](std::span<const std::int32_t> prompt, int max_new) {
    const std::string text = addition_task::to_text(prompt);
    const auto full = task.encode(std::stoull(text.substr(0, 3)), std::stoull(text.substr(4, 3)));
    REQUIRE(max_new == task.answer_length());
    // Extra tokens after the end token are ignored.
    std::vector<std::int32_t> out(full.begin() + task.prompt_length(), full.end());
    out.push_back(3);
    return out;
  };
  CHECK(task.exact_match(oracle) == 1.0);
  CHECK(task.exact_match(oracle, 10) == 1.0);

  auto off_by_one = [&](std::span<const std::int32_t> prompt, int max_new) {
    auto out = oracle(prompt, max_new);
    out[0] = (out[0] + 1) % 10;
    return out;
  };
  CHECK(task.exact_match(off_by_one) == 0.0);
  auto too_short = [&](std::span<const std::int32_t> prompt, int max_new) {
    auto out = oracle(prompt, max_new);
    out.resize(2);
    return out;
  };
  CHECK(task.exact_match(too_short) == 0.0);

  // Half right: correct on even first operands.
  std::size_t even = 0;
  for (const auto& [a, b] : task.heldout_problems()) even += a % 2 == 0;
  auto half = [&](std::span<const std::int32_t> prompt, int max_new) {
    auto out = oracle(prompt, max_new);
    if (prompt[2] % 2 == 1) out[0] = (out[0] + 1) % 10;
    return out;
  };
  CHECK(task.exact_match(half) == Approx(double(even) / 300.0));
}

TEST_CASE("the metrics writer writes one flushed JSON object per line", "[train][metrics]") {
  const auto dir = std::filesystem::temp_directory_path() / ("ctformer_metrics_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = dir / "metrics.jsonl";
  {
    train::jsonl_writer w(path);
    w.write(train::step_metrics{1, 2.5, std::nullopt, 1e-3, 0.75, 1234.0});
    // Flushed: readable before the writer closes.
    std::ifstream in(path);
    std::string line;
    REQUIRE(std::getline(in, line));
    const auto j = nlohmann::json::parse(line);
    CHECK(j["step"] == 1);
    CHECK(j["loss"] == 2.5);
    CHECK_FALSE(j.contains("val_loss"));
    CHECK(j["lr"] == 1e-3);
    CHECK(j["grad_norm"] == 0.75);
    CHECK(j["tokens_per_s"] == 1234.0);
    w.write(train::step_metrics{2, std::nan(""), 1.9, 1e-3, 0.5, 1000.0});
  }
  std::ifstream in(path);
  std::string first, second;
  std::getline(in, first);
  std::getline(in, second);
  const auto j = nlohmann::json::parse(second);
  CHECK(j["loss"].is_null());  // NaN has no JSON spelling
  CHECK(j["val_loss"] == 1.9);
  {
    train::jsonl_writer w(path, true);
    w.write(train::step_metrics{3, 1.0, std::nullopt, 1e-4, 0.1, 10.0});
  }
  std::ifstream again(path);
  int lines = 0;
  for (std::string l; std::getline(again, l);) ++lines;
  CHECK(lines == 3);
  CHECK_THROWS_AS(train::jsonl_writer(dir / "no_such_folder" / "m.jsonl"), io_error);
  std::filesystem::remove_all(dir);
}

TEST_CASE("the progress bar draws only when enabled", "[train][metrics]") {
  train::progress_bar bar(100, stdout, false);
  CHECK_FALSE(bar.enabled());
  bar.update(10, 1.0, 5.0);  // prints nothing
  const std::string line = bar.line(50, 1.2345, 6789.0);
  CHECK(line.front() == '\r');
  CHECK_THAT(line, Catch::Contains("50/100") && Catch::Contains("loss 1.2345") && Catch::Contains("6789 tok/s"));
  CHECK_THAT(line, Catch::Contains("[###############...............]"));
}
