// Specification of the safetensors reader and writer (common/core/safetensors.h, common/model/checkpoint.h).
#include <catch2/catch.hpp>

#include <cstring>
#include <fstream>

#include "common/model/checkpoint.h"
#include "common/core/file_util.h"
#include "common/core/safetensors.h"
#include "common/core/sha256.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::TempDir;
using testing::ValueOrDie;

// A file made of an 8-byte length, `header` verbatim and `data_bytes` bytes of data.
std::string RawFile(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  out += header;
  out.append(data_bytes, '\x01');
  return out;
}

absl::Status Parse(const std::string& file) {
  return ParseSafetensors("bad.safetensors", reinterpret_cast<const uint8_t*>(file.data()), file.size()).status();
}

std::string ErrorOf(const std::string& file) {
  absl::Status s = Parse(file);
  return s.ok() ? "OK" : std::string(s.message());
}

TEST_CASE("safetensors round trip keeps every dtype, shape and value", "[safetensors]") {
  TempDir dir;
  std::vector<NamedTensor> tensors = {
      {"f32", at::randn({3, 5})},
      {"f16", at::randn({4}).to(at::kHalf)},
      {"bf16", at::randn({2, 2, 3}).to(at::kBFloat16)},
      {"i64", at::arange(7, at::kLong)},
      {"i32", at::arange(-3, 6, at::kInt)},
      {"u8", at::arange(0, 250, 7, at::kLong).to(at::kByte)},
      {"bool", at::tensor({1, 0, 1}).to(at::kBool)},
      {"scalar", at::tensor(3.5f).reshape({})},
      {"empty", at::empty({0, 4})},
  };
  const std::string path = dir / "t.safetensors";
  REQUIRE(WriteSafetensors(path, tensors, {{"owner", "math"}, {"format", "pt"}}).ok());
  auto file = ValueOrDie(SafetensorsFile::Open(path));
  CHECK(file->metadata() == std::map<std::string, std::string>{{"owner", "math"}, {"format", "pt"}});
  CHECK(file->Names().size() == tensors.size());
  for (const NamedTensor& nt : tensors) {
    at::Tensor back = ValueOrDie(file->Get(nt.name));
    INFO(nt.name);
    CHECK(back.scalar_type() == nt.tensor.scalar_type());
    CHECK(back.sizes() == nt.tensor.sizes());
    CHECK(at::equal(back, nt.tensor));
  }
}

TEST_CASE("safetensors writer is deterministic, order-independent and pads the header to 8 bytes", "[safetensors]") {
  TempDir dir;
  at::Tensor a = at::randn({3, 3}), b = at::arange(5, at::kInt), c = at::randn({2}).to(at::kBFloat16);
  REQUIRE(WriteSafetensors(dir / "1", {{"a", a}, {"b", b}, {"c", c}}, {{"k", "v"}}).ok());
  REQUIRE(WriteSafetensors(dir / "2", {{"c", c}, {"a", a}, {"b", b}}, {{"k", "v"}}).ok());
  const std::string one = ValueOrDie(ReadFile(dir / "1")), two = ValueOrDie(ReadFile(dir / "2"));
  CHECK(one == two);
  uint64_t header_len;
  std::memcpy(&header_len, one.data(), 8);
  CHECK(header_len % 8 == 0);
  // Larger elements first: every tensor's data is aligned to its element size.
  auto layout = ValueOrDie(ParseSafetensors("1", reinterpret_cast<const uint8_t*>(one.data()), one.size()));
  for (const TensorInfo& t : layout.tensors) CHECK((layout.data_offset + t.begin) % DtypeSize(t.dtype) == 0);
}

TEST_CASE("safetensors tensors are zero-copy views of the mapped file", "[safetensors]") {
  TempDir dir;
  REQUIRE(WriteSafetensors(dir / "z", {{"w", at::randn({64, 64})}}).ok());
  auto file = ValueOrDie(SafetensorsFile::Open(dir / "z"));
  at::Tensor first = ValueOrDie(file->Get("w")), second = ValueOrDie(file->Get("w"));
  CHECK(first.data_ptr() == second.data_ptr());
  CHECK(static_cast<const char*>(first.data_ptr()) == file->Bytes(*file->Find("w")).data());
  // Views keep the mapping alive after the file object is gone.
  file.reset();
  CHECK(first.sum().item<float>() == second.sum().item<float>());
}

TEST_CASE("writing tensors read from a mapped file gives their pages back, and nothing else", "[safetensors]") {
  // A merge or export of a 7B model writes 14-23 GB of mapped tensors: without this the resident
  // memory grew to the model's size (issue #12: owner export 15.4 GB at 1B shape, merge 4.9 GB).
  TempDir dir;
  const int64_t n = 32 << 20;  // 128 MB of fp32
  at::manual_seed(3);
  REQUIRE(WriteSafetensors(dir / "a", {{"x", at::rand({n})}}).ok());
  auto file = ValueOrDie(SafetensorsFile::Open(dir / "a"));
  at::Tensor x = ValueOrDie(file->Get("x"));
  const int64_t base = testing::ResidentBytes();
  const double sum = x.sum().item<double>();  // reads every page
  const int64_t read = testing::ResidentBytes() - base;
  CHECK(read > 100'000'000);
  REQUIRE(WriteSafetensors(dir / "b", {{"x", x}}).ok());
  const int64_t after = testing::ResidentBytes() - base;
  INFO("resident +" << read / 1e6 << " MB after reading, +" << after / 1e6 << " MB after writing");
  CHECK(after < 16'000'000);
  CHECK(ValueOrDie(Sha256File(dir / "b")) == ValueOrDie(Sha256File(dir / "a")));
  CHECK(x.sum().item<double>() == sum);  // read again from the file
  // Memory no file maps is left alone.
  at::Tensor y = at::full({1 << 20}, 2.0f);
  ReleaseMappedPages(y.data_ptr(), y.nbytes());
  CHECK(y.sum().item<double>() == 2.0 * (1 << 20));
}

TEST_CASE("safetensors reader copies unaligned tensors instead of misreading them", "[safetensors]") {
  // One U8 byte before an F32 tensor puts the F32 data at an odd address.
  std::string header = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string file = RawFile(header, 0);
  const float values[2] = {1.5f, -2.25f};
  file.push_back('\x07');
  file.append(reinterpret_cast<const char*>(values), sizeof values);
  TempDir dir;
  REQUIRE(WriteFileAtomically(dir / "u", file).ok());
  auto st = ValueOrDie(SafetensorsFile::Open(dir / "u"));
  at::Tensor b = ValueOrDie(st->Get("b"));
  CHECK(b[0].item<float>() == 1.5f);
  CHECK(b[1].item<float>() == -2.25f);
}

TEST_CASE("safetensors reader rejects malformed files with a message naming file and tensor", "[safetensors]") {
  const std::string ok_entry = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

  SECTION("valid baseline parses") { CHECK(ErrorOf(RawFile("{" + ok_entry + "}", 8)) == "OK"); }
  SECTION("too short for the length prefix") { CHECK_THAT(ErrorOf("abc"), Catch::Contains("too short")); }
  SECTION("header length over 100 MB") {
    std::string f(8, '\0');
    const uint64_t n = 100'000'001;
    std::memcpy(f.data(), &n, 8);
    CHECK_THAT(ErrorOf(f), Catch::Contains("100 MB"));
  }
  SECTION("header length past the end of the file") {
    std::string f = RawFile("{" + ok_entry + "}", 8);
    const uint64_t n = f.size();
    std::memcpy(f.data(), &n, 8);
    CHECK_THAT(ErrorOf(f), Catch::Contains("past the end"));
  }
  SECTION("invalid JSON") { CHECK_THAT(ErrorOf(RawFile("{\"w\":", 0)), Catch::Contains("not valid JSON")); }
  SECTION("header is not an object") { CHECK_THAT(ErrorOf(RawFile("[1,2]", 0)), Catch::Contains("not a JSON object")); }
  SECTION("unknown dtype") {
    CHECK_THAT(ErrorOf(RawFile(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2)),
               Catch::Contains("tensor 'w'") && Catch::Contains("unknown dtype 'F8_E4M3'"));
  }
  SECTION("byte range differs from numel x dtype size") {
    CHECK_THAT(ErrorOf(RawFile(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)),
               Catch::Contains("tensor 'w'") && Catch::Contains("needs 12"));
  }
  SECTION("offsets not starting at 0") {
    CHECK_THAT(ErrorOf(RawFile(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12)),
               Catch::Contains("tensor 'w'") && Catch::Contains("belong to no tensor"));
  }
  SECTION("overlapping tensors") {
    CHECK_THAT(ErrorOf(RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8)),
               Catch::Contains("overlap"));
  }
  SECTION("gap between tensors") {
    CHECK_THAT(ErrorOf(RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12)),
               Catch::Contains("tensor 'b'") && Catch::Contains("belong to no tensor"));
  }
  SECTION("trailing bytes covered by no tensor") {
    CHECK_THAT(ErrorOf(RawFile("{" + ok_entry + "}", 12)), Catch::Contains("last 4 bytes") && Catch::Contains("no tensor"));
  }
  SECTION("data past the end of the file") {
    CHECK_THAT(ErrorOf(RawFile("{" + ok_entry + "}", 4)), Catch::Contains("tensor 'w'") && Catch::Contains("truncated"));
  }
  SECTION("duplicate tensor names") {
    CHECK_THAT(ErrorOf(RawFile("{" + ok_entry + "," + ok_entry + "}", 8)), Catch::Contains("duplicate name 'w'"));
  }
  SECTION("numel x size overflows 64 bits") {
    CHECK_THAT(ErrorOf(RawFile(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0)),
               Catch::Contains("tensor 'w'") && Catch::Contains("overflow"));
  }
  SECTION("negative or fractional shape") {
    CHECK_THAT(ErrorOf(RawFile(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,0]}})", 0)),
               Catch::Contains("non-negative integer"));
    CHECK_THAT(ErrorOf(RawFile(R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,0]}})", 0)),
               Catch::Contains("non-negative integer"));
  }
  SECTION("non-string metadata") {
    CHECK_THAT(ErrorOf(RawFile(R"({"__metadata__":{"steps":3},)" + ok_entry + "}", 8)),
               Catch::Contains("__metadata__") && Catch::Contains("not a string"));
  }
  SECTION("unexpected field in a tensor entry") {
    CHECK_THAT(ErrorOf(RawFile(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8)),
               Catch::Contains("unexpected field 'x'"));
  }
  SECTION("every error names the file") {
    CHECK_THAT(ErrorOf(RawFile("{\"w\":", 0)), Catch::StartsWith("bad.safetensors: "));
  }
}

TEST_CASE("a truncated file on disk is refused on open", "[safetensors]") {
  TempDir dir;
  REQUIRE(WriteSafetensors(dir / "t", {{"w", at::randn({16})}}).ok());
  std::string bytes = ValueOrDie(ReadFile(dir / "t"));
  REQUIRE(WriteFileAtomically(dir / "t", bytes.substr(0, bytes.size() - 3)).ok());
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> f = SafetensorsFile::Open(dir / "t");
  REQUIRE_FALSE(f.ok());
  CHECK_THAT(std::string(f.status().message()), Catch::Contains(dir / "t") && Catch::Contains("truncated"));
}

TEST_CASE("sharded checkpoints split by size and read back through the index", "[safetensors]") {
  TempDir dir;
  std::vector<NamedTensor> tensors;
  for (int i = 0; i < 6; ++i) tensors.push_back({"layer." + std::to_string(i), at::randn({32, 32})});  // 4 KiB each
  REQUIRE(WriteCheckpoint(dir.path(), tensors, {}, /*max_shard_bytes=*/10000).ok());
  CHECK(std::filesystem::exists(dir / kIndexFileName));
  CHECK(std::filesystem::exists(dir / "model-00003-of-00003.safetensors"));
  CHECK_FALSE(std::filesystem::exists(dir / kSingleFileName));
  Checkpoint ckpt = ValueOrDie(Checkpoint::Open(dir.path()));
  CHECK(ckpt.shards().size() == 3);
  for (const NamedTensor& nt : tensors) CHECK(at::equal(ValueOrDie(ckpt.Get(nt.name)), nt.tensor));

  // Rewriting as one file replaces the shards and the index.
  REQUIRE(WriteCheckpoint(dir.path(), tensors).ok());
  CHECK(std::filesystem::exists(dir / kSingleFileName));
  CHECK_FALSE(std::filesystem::exists(dir / kIndexFileName));
  CHECK_FALSE(std::filesystem::exists(dir / "model-00001-of-00003.safetensors"));
  CHECK(ValueOrDie(Checkpoint::Open(dir.path())).shards().size() == 1);
}

TEST_CASE("sharded checkpoint index errors are caught", "[safetensors]") {
  TempDir dir;
  // 1200 bytes each, shards of at most 2500 bytes: {a, b} and {c}.
  REQUIRE(WriteCheckpoint(dir.path(), {{"a", at::ones({300})}, {"b", at::ones({300})}, {"c", at::ones({300})}}, {}, 2500).ok());
  auto open_error = [&] {
    absl::StatusOr<Checkpoint> c = Checkpoint::Open(dir.path());
    return c.ok() ? std::string("OK") : std::string(c.status().message());
  };
  REQUIRE(open_error() == "OK");
  SECTION("a tensor listed in the wrong shard") {
    REQUIRE(WriteFileAtomically(dir / kIndexFileName,
                                R"({"weight_map":{"a":"model-00002-of-00002.safetensors","b":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}})").ok());
    CHECK_THAT(open_error(), Catch::Contains("'a'") && Catch::Contains("does not hold it"));
  }
  SECTION("a tensor in a shard but not in the index") {
    REQUIRE(WriteFileAtomically(dir / kIndexFileName,
                                R"({"weight_map":{"a":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}})").ok());
    CHECK_THAT(open_error(), Catch::Contains("'b' is not listed"));
  }
  SECTION("a shard path escaping the directory") {
    REQUIRE(WriteFileAtomically(dir / kIndexFileName, R"({"weight_map":{"a":"../x.safetensors"}})").ok());
    CHECK_THAT(open_error(), Catch::Contains("not a file in this directory"));
  }
  SECTION("no checkpoint at all") {
    TempDir empty;
    absl::StatusOr<Checkpoint> c = Checkpoint::Open(empty.path());
    CHECK(absl::IsNotFound(c.status()));
  }
}

}  // namespace
}  // namespace flexfed
