// flexfed-evaluate: runs the evaluation suite (evaluation/suite.h) from a JSON spec and writes the
// results as JSON; prints the table and the checks. docs/EVALUATION.md shows a spec.
#include <CLI/CLI.hpp>

#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/core/file_util.h"
#include "evaluation/suite.h"

int main(int argc, char** argv) {
  CLI::App app{"flexfed-evaluate: baselines, FlexOlmo merged, ablations and opt-outs on held-out text per domain"};
  std::string spec_path, out;
  bool json_out = false;
  app.add_option("spec", spec_path, "Suite spec (JSON: anchor, domains, owners, top_k, ...)")->required()->check(CLI::ExistingFile);
  app.add_option("--out,-o", out, "Write the results (JSON) here");
  app.add_flag("--json", json_out, "Print the results as JSON instead of the table");
  app.footer("Exit codes: 0 success (whether or not every check holds), 1 the suite could not run, 2 bad usage.");
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const absl::Status& s) {
    std::cerr << "flexfed-evaluate: error: " << s.message() << "\n";
    return 1;
  };
  absl::StatusOr<std::string> text = flexfed::ReadFile(spec_path);
  if (!text.ok()) return fail(text.status());
  const nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return fail(absl::InvalidArgumentError(absl::StrCat(spec_path, ": not valid JSON")));
  absl::StatusOr<flexfed::SuiteSpec> spec = flexfed::SuiteSpec::FromJson(j, spec_path);
  if (!spec.ok()) return fail(spec.status());
  absl::StatusOr<nlohmann::json> result = flexfed::RunSuite(*spec, [&](const std::string& line) {
    (json_out ? std::cerr : std::cout) << line << std::endl;
  });
  if (!result.ok()) return fail(result.status());
  if (!out.empty()) {
    if (absl::Status s = flexfed::WriteFileAtomically(out, result->dump(2) + "\n"); !s.ok()) return fail(s);
  }
  if (json_out) {
    std::cout << result->dump() << "\n";
    return 0;
  }
  std::cout << "\nBits per byte on held-out text (lower is better; the average is over the single-domain columns):\n\n"
            << (*result)["table"].get<std::string>()
            << "\nThe merged model against each row (merged / row - 1; 95% paired bootstrap interval over sequences):\n\n"
            << (*result)["differences_table"].get<std::string>()
            << "\nRouting of the merged model (share of tokens whose first choice is each expert):\n\n"
            << (*result)["routing_table"].get<std::string>()
            << "\nThe paper's claims (holds: on the point estimate and the whole 95% interval; leans: on the point estimate only):\n";
  for (const auto& c : (*result)["checks"]) {
    const char* verdict = !c["holds"].get<bool>() ? "  FAILS   " : c["confident"].get<bool>() ? "  holds   " : "  leans   ";
    std::cout << verdict << c["claim"].get<std::string>() << ": " << c["detail"].get<std::string>() << "\n";
  }
  return 0;
}
