"""Word lists of the demo corpus: cities, first names, plain words, and the phrasebook.

`demo/corpus.py` splits cities and names into training and held-out sets by a hash of the word,
so the evaluation asks about cities and people the model never saw.
"""
from __future__ import annotations

CITIES = """\
Valencia Leeds Paris Berlin Madrid Rome Lisbon Porto Seville Bilbao Barcelona Malaga Granada Zaragoza
Lyon Marseille Nice Toulouse Bordeaux Lille Nantes Strasbourg Brussels Antwerp Ghent Bruges Amsterdam
Rotterdam Utrecht Eindhoven Hamburg Munich Cologne Frankfurt Stuttgart Dresden Leipzig Bremen Hanover
Vienna Salzburg Graz Zurich Geneva Basel Bern Lausanne Milan Turin Naples Florence Venice Bologna Genoa
Palermo Verona Athens Thessaloniki Sofia Bucharest Budapest Prague Brno Bratislava Warsaw Krakow Gdansk
Wroclaw Poznan Vilnius Riga Tallinn Helsinki Stockholm Gothenburg Malmo Oslo Bergen Copenhagen Aarhus
Dublin Cork Galway Belfast Edinburgh Glasgow Aberdeen Cardiff Bristol London Manchester Liverpool
Birmingham Sheffield Newcastle Nottingham Oxford Cambridge Brighton York Reykjavik Istanbul Ankara Izmir
Cairo Alexandria Tunis Algiers Casablanca Marrakesh Rabat Dakar Lagos Accra Nairobi Mombasa Kampala
Kigali Addis Luanda Harare Lusaka Durban Johannesburg Pretoria Windhoek Maputo Dubai Doha Riyadh Jeddah
Muscat Amman Beirut Baghdad Tehran Karachi Lahore Delhi Mumbai Chennai Kolkata Bangalore Hyderabad Pune
Jaipur Kathmandu Dhaka Colombo Bangkok Hanoi Saigon Phnom Vientiane Yangon Manila Cebu Jakarta Bandung
Surabaya Singapore Penang Taipei Kaohsiung Seoul Busan Tokyo Osaka Kyoto Nagoya Sapporo Fukuoka Beijing
Shanghai Shenzhen Guangzhou Chengdu Wuhan Xian Nanjing Hangzhou Harbin Ulaanbaatar Almaty Tashkent Baku
Tbilisi Yerevan Moscow Kazan Novosibirsk Kyiv Lviv Odesa Minsk Chisinau Sydney Melbourne Brisbane Perth
Adelaide Hobart Darwin Auckland Wellington Christchurch Toronto Montreal Vancouver Calgary Ottawa Quebec
Halifax Winnipeg Seattle Portland Boston Chicago Denver Austin Dallas Houston Phoenix Atlanta Miami
Orlando Detroit Nashville Memphis Baltimore Philadelphia Pittsburgh Cleveland Minneapolis Honolulu
Anchorage Mexico Guadalajara Monterrey Havana Kingston Bogota Medellin Quito Lima Cusco Santiago
Valparaiso Mendoza Cordoba Rosario Montevideo Asuncion Caracas Recife Salvador Fortaleza Manaus Curitiba
Brasilia Belem Natal Lusail Tirana Skopje Podgorica Sarajevo Belgrade Zagreb Split Ljubljana Trieste
""".split()  # noqa: SIM905 (a block of words reads better than a list literal)

NAMES = """\
Tomas Anna Maria Lucia Sofia Elena Clara Marta Laura Julia Emma Olivia Mia Nora Ingrid Astrid Freya
Hanna Greta Lena Paula Irene Rosa Carmen Pilar Teresa Nadia Leila Amira Fatima Zainab Aisha Yasmin
Priya Anika Meera Kavya Sanjana Mei Lin Yuki Haruka Akiko Sakura Jiwoo Minji Seoyeon Linh Mai Thao
Ana Beatriz Camila Valentina Isabela Gabriela Daniela Renata Fernanda Lorena Chloe Camille Manon Elise
Margot Ines Alice Zoe Lily Grace Ella Ruby Evie Isla Holly Amber Sienna Daisy Jasmine Hazel Ivy Maya
Tom Jack Harry Oliver George Noah Leo Oscar Henry Arthur Finn Hugo Felix Max Paul Jonas Lukas Elias
Ben Emil Anton Karl Erik Lars Nils Sven Olaf Bjorn Magnus Mateo Diego Pablo Javier Carlos Miguel Rafael
Andres Luis Jorge Mario Bruno Marco Luca Matteo Giulio Enzo Pierre Louis Jules Theo Victor Samuel Adam
Omar Karim Yusuf Hassan Tariq Ali Reza Arjun Rahul Vikram Rohan Kiran Wei Jun Hiro Kenji Taro Daichi
Minho Jisung Duc Minh Kofi Kwame Tunde Chidi Jabari Tendai Sipho Ivan Dmitri Pavel Oleg Igor Piotr
Marek Tomasz Jakub Ondrej Milan Dario Goran Nikola Stefan Andrei Mihai Bogdan Levente Balazs Aron
Kai Rio Ezra Silas Jude Rowan Ellis Quinn Rene Ada Ruth Vera Olga Irina Daria Alina Kira Zara Eva
""".split()  # noqa: SIM905 (a block of words reads better than a list literal)

WORDS = """\
apple river stone cloud tiger lemon candle forest garden window pencil rocket mirror bottle planet
dragon castle silver copper orange violet yellow purple marble pepper butter honey bread cheese salad
coffee sugar salt ocean island valley desert meadow harbor bridge tunnel tower market village station
rabbit turtle falcon parrot salmon beetle spider monkey donkey camel zebra panda koala otter badger
hammer ladder basket blanket pillow carpet button needle ribbon jacket helmet wallet ticket letter
winter summer autumn spring morning evening sunset thunder shadow silence music poem story dream
number circle square arrow anchor engine wheel kettle teapot spoon fork plate glass paper
lamp chair table sofa door floor wall roof street corner plaza park field farm barn hill lake pond
""".split()  # noqa: SIM905 (a block of words reads better than a list literal)

LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Swedish", "Polish",
             "Turkish", "Indonesian", "Russian", "Japanese", "Chinese")
PHRASES = ("hello", "thank you", "goodbye", "yes", "no", "please", "good morning")
PHRASEBOOK = {
    "French": ("Bonjour", "Merci", "Au revoir", "Oui", "Non", "S'il vous plaît", "Bonjour"),
    "Spanish": ("Hola", "Gracias", "Adiós", "Sí", "No", "Por favor", "Buenos días"),
    "German": ("Hallo", "Danke", "Auf Wiedersehen", "Ja", "Nein", "Bitte", "Guten Morgen"),
    "Italian": ("Ciao", "Grazie", "Arrivederci", "Sì", "No", "Per favore", "Buongiorno"),
    "Portuguese": ("Olá", "Obrigado", "Adeus", "Sim", "Não", "Por favor", "Bom dia"),
    "Dutch": ("Hallo", "Dank je", "Tot ziens", "Ja", "Nee", "Alsjeblieft", "Goedemorgen"),
    "Swedish": ("Hej", "Tack", "Hej då", "Ja", "Nej", "Snälla", "God morgon"),
    "Polish": ("Cześć", "Dziękuję", "Do widzenia", "Tak", "Nie", "Proszę", "Dzień dobry"),
    "Turkish": ("Merhaba", "Teşekkür ederim", "Hoşça kal", "Evet", "Hayır", "Lütfen", "Günaydın"),
    "Indonesian": ("Halo", "Terima kasih", "Selamat tinggal", "Ya", "Tidak", "Tolong", "Selamat pagi"),
    "Russian": ("Привет", "Спасибо", "До свидания", "Да", "Нет", "Пожалуйста", "Доброе утро"),
    "Japanese": ("こんにちは", "ありがとう", "さようなら", "はい", "いいえ", "お願いします", "おはようございます"),
    "Chinese": ("你好", "谢谢", "再见", "是", "不是", "请", "早上好"),
}

CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK", "PLN", "INR", "CNY", "MXN", "BRL")
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy", "partly cloudy")
